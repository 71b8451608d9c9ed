"""The command lines: `python -m rloss {train,test,time,device_query,infer}` (main), with one module
per command (train, evaluate, timing, infer) and what they share (common); `python -m rloss.solve` is
the train command on its own."""

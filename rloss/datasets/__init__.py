"""One's own data as ImageSegData reads it: pairing and checking folders of images and labels,
writing a DATA_ROOT tree, checking an existing one, and making scribble label maps (strokes from
full masks, the PASCAL-Scribble annotation files). The command line is `python -m rloss data`
(rloss.cli.data)."""

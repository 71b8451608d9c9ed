"""Finding a dataset's files in folders and pairing them by file stem (`x.jpg` with `x.png`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rloss.datasets.problems import Problems

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LABEL_SUFFIXES = (".png",)


@dataclass(frozen=True)
class Found:
    """The files of one role ('image', 'scribbles', ...) found in a folder, by stem."""

    role: str
    folder: Path
    files: dict[str, Path]


def files_by_stem(folder: Path, suffixes: tuple[str, ...], role: str, problems: Problems) -> Found:
    """The files of `folder` (not its subfolders; hidden files skipped) whose suffix, in any case,
    is one of `suffixes`. A missing or empty folder, two files of one stem and a name with
    whitespace (a list file line cannot hold it) are problems."""
    found = Found(role, folder, {})
    if not folder.is_dir():
        problems.add(f"{role} folder '{folder}' does not exist or is not a folder")
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if any(character.isspace() for character in path.name):
            problems.add(f"{role} '{path}': its name has whitespace, which a list file line cannot hold; rename it")
        elif path.stem in found.files:
            problems.add(f"{role} '{path}' and '{found.files[path.stem]}' have the same stem '{path.stem}'; "
                         "keep one")
        else:
            found.files[path.stem] = path
    if not found.files:
        problems.add(f"{role} folder '{folder}' has no {'/'.join(suffixes)} file")
    return found


@dataclass(frozen=True)
class Sample:
    """An image and its label files: scribbles, and the full ground truth when there is one."""

    stem: str
    image: Path
    scribbles: Path
    truth: Path | None


def pair(images: Found, scribbles: Found, truth: Found | None, problems: Problems) -> list[Sample]:
    """The samples whose files are all there, by stem; each file without its partners is a problem."""
    labels = [scribbles] if truth is None else [scribbles, truth]
    for found in labels:
        for stem in sorted(images.files.keys() - found.files.keys()):
            problems.add(f"image '{images.files[stem]}' has no {found.role}: no {stem}.png in '{found.folder}'")
        for stem in sorted(found.files.keys() - images.files.keys()):
            problems.add(f"{found.role} '{found.files[stem]}' has no image: no {stem} with suffix "
                         f"{'/'.join(IMAGE_SUFFIXES)} in '{images.folder}'")
    stems = sorted(set(images.files).intersection(*(found.files for found in labels)))
    return [Sample(stem, images.files[stem], scribbles.files[stem], truth.files[stem] if truth else None)
            for stem in stems]

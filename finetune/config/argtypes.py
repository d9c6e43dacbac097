"""``argparse`` types of the command line's convert flags: a bad value is argparse's one-line error.

>>> rank_arg("1")
1
"""

from __future__ import annotations

import argparse
import json
import os


def rank_arg(text: str) -> int | str:
    """``--rank``: a whole number or ``full``.

    >>> rank_arg("3"), rank_arg("full")
    (3, 'full')
    """
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not a rank; give a whole number or `full`") from None


def json_object_arg(text: str) -> dict:
    """``--builder-kwargs``-style JSON objects.

    >>> json_object_arg('{"num_classes": 10}')
    {'num_classes': 10}
    """
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"`{text}` is not JSON ({exc}); give an object, e.g. "
                                         "'{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"`{text}` is a JSON {type(value).__name__}; give an object, e.g. "
                                         "'{\"num_classes\": 10}'")
    return value


def classes_arg(text: str) -> list[str]:
    """``cat,dog,bird`` or a text file with one class name per line.

    >>> classes_arg("cat, dog")
    ['cat', 'dog']
    """
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
    else:
        names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"`{text}` holds no class names; give `cat,dog,...` or a text file with "
                                         "one name per line")
    return names

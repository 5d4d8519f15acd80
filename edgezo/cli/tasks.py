"""Task options shared by the two export commands (``edgezo export``, ``python -m exporters``).

Defined on the runtime side (no torch) so that ``edgezo``'s CLI does not import the exporters.
"""

from __future__ import annotations

import click

from ..bundle import TASKS
from ..data import label_names
from ..errors import EdgezoError


def task_kwargs(
    task: str,
    labels: str | None,
    labels_from: str | None,
    head_init: str,
    template: str | None,
    label_words: str | None,
) -> dict:
    """The task options of both export CLIs as keyword arguments of ``export_bundle``.

    ``labels``: comma-separated names (or ``labels_from`` a JSONL file's labels);
    ``label_words``: comma-separated, kept verbatim (a leading space matters); default: each
    label with a leading space.
    """
    if labels and labels_from:
        raise EdgezoError("--labels and --labels-from were both given", "pass one of them")
    names = None
    if labels_from:
        names = label_names(labels_from)
    elif labels:
        names = [x.strip() for x in labels.split(",") if x.strip()]
    if task == "causal_lm":
        if names or template or label_words:
            raise EdgezoError(
                "--labels/--template/--label-words were given for --task causal_lm",
                "pass --task classification (an encoder) or --task prompt_classification",
            )
        return {}
    if not names:
        raise EdgezoError(
            f"--task {task} needs the label set", "pass --labels a,b,c or --labels-from data.jsonl"
        )
    if task == "classification":
        if template or label_words:
            raise EdgezoError(
                "--template/--label-words are for --task prompt_classification",
                "drop them for an encoder classifier",
            )
        return {"labels": names, "head_init": head_init}
    words = label_words.split(",") if label_words else [f" {n}" for n in names]
    return {"labels": names, "template": template or "{text}\nTopic:", "label_words": words}


TASK_OPTIONS = [
    click.option(
        "--task",
        type=click.Choice(TASKS),
        default="causal_lm",
        show_default=True,
        help="causal_lm; classification (encoder + head); prompt_classification "
        "(causal LM scored on one label word per class).",
    ),
    click.option(
        "--labels", default=None, help="Comma-separated class names (classification tasks)."
    ),
    click.option(
        "--labels-from",
        default=None,
        type=click.Path(),
        help='Read the class names from a {"text", "label"} JSONL file.',
    ),
    click.option(
        "--head-init",
        type=click.Choice(["zero", "random"]),
        default="zero",
        show_default=True,
        help="A new classification head's initial weights.",
    ),
    click.option(
        "--template",
        default=None,
        help='prompt_classification: prompt with {text} [default: "{text}\\nTopic:"].',
    ),
    click.option(
        "--label-words",
        default=None,
        help="prompt_classification: comma-separated, verbatim [default: ' <label>'].",
    ),
]


def task_options(fn):
    """Add the task options (``TASK_OPTIONS``) to a click command."""
    for option in reversed(TASK_OPTIONS):
        fn = option(fn)
    return fn

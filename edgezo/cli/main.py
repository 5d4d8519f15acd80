"""The ``edgezo`` command line.

Runtime commands (finetune, eval, generate, replay, plan, devices) never import torch; ``export``
imports the exporters (torch, transformers) only when it runs.
"""

from __future__ import annotations

import sys

import click

from ..errors import EdgezoError
from .devices import devices
from .errors import friendly_errors, notes_as_lines
from .export import export
from .federate import federate
from .handoff import handoff
from .report import report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgezo")
def main() -> None:
    """edgezo: private on-device fine-tuning with forward passes only (zeroth-order)."""
    notes_as_lines()


# -- export and compare (desktop) ---------------------------------------------------------

main.add_command(export)
main.add_command(handoff)
main.add_command(report)


@main.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.pass_context
def compare(ctx):
    """Desktop: parity and forward timings of a bundle on every provider and on PyTorch.

    Options: --bundle B [--model SRC --tensors T --batch 8 --seq 64 --threads 2 --no-torch];
    `edgezo compare --help` lists them.
    """
    try:
        from exporters.compare import main as compare_main
    except ImportError as e:
        raise EdgezoError(
            f"the exporter side cannot be imported ({e})",
            "install it: pip install torch==2.13.0 -e '.[export]'",
        ) from None
    compare_main.main(args=list(ctx.args), prog_name="edgezo compare")


# -- finetune ---------------------------------------------------------------------------------


@main.command(context_settings={"show_default": True})
@click.option(
    "--config",
    "config_path",
    type=click.Path(),
    default=None,
    help="YAML file with FinetuneConfig fields; flags and key=value override it",
)
@click.option("--bundle", default=None, help="bundle folder (default: SmolLM2-135M LoRA)")
@click.option("--data", default=None, help="JSONL training data (default: sample notes)")
@click.option("--eval-data", default=None, help="JSONL held-out data")
@click.option("--out", default=None, help="run folder (default: runs/finetune-<time>)")
@click.option("--steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--max-length", type=int, default=None)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="default: the recipe's rate for the bundle's mode; where the recipe sets lr_race "
    "(norms, head), a short learning-rate race at the start chooses it",
)
@click.option(
    "--mu",
    type=float,
    default=None,
    help="default: the recipe's, checked at the start against float32 noise (autotune)",
)
@click.option("--q", type=int, default=None, help="directions per step")
@click.option("--seed", type=int, default=None)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--threads", type=int, default=None)
@click.option(
    "--device",
    default=None,
    help="device profile (name, family or YAML path): caps, providers, budgets",
)
@click.option(
    "--micro-batch-size",
    type=int,
    default=None,
    help="examples per forward call (default: the profile's max_batch_size)",
)
@click.option(
    "--eval-budget",
    type=int,
    default=None,
    help="training forward evaluations this session (default: the profile's)",
)
@click.option(
    "--time-budget",
    "time_budget_s",
    type=float,
    default=None,
    help="wall-clock seconds this session (default: the profile's)",
)
@click.option("--resume", is_flag=True, help="continue the run in --out from its ledger")
@click.option("--no-progress", is_flag=True, help="plain log lines instead of a progress bar")
@click.argument("overrides", nargs=-1)
@friendly_errors
def finetune(config_path, resume, no_progress, overrides, **flags):
    """Personalise a bundle on your data with zeroth-order steps (forward passes only).

    With no arguments: SmolLM2-135M-Instruct (LoRA) on the embedded sample notes.
    Extra KEY=VALUE arguments set any config field, e.g. `momentum=0 schedule=cosine`.
    With --device the profile sets providers, threads, memory, micro-batching and the
    session budgets; a run that spends a budget stops with a checkpoint: continue it with
    --resume --out DIR in the next session.
    """
    from ..config import FinetuneConfig
    from ..configio import parse_overrides
    from ..train import finetune as run

    values = {k: v for k, v in flags.items() if v is not None}
    values.update(parse_overrides(overrides))
    cfg = FinetuneConfig.load(config_path, values)
    if resume and cfg.out is None:
        raise EdgezoError(
            "--resume needs --out: the folder of the run to continue",
            "e.g. edgezo finetune --resume --out runs/finetune-...",
        )
    run(cfg, resume=resume, log=click.echo, progress=False if no_progress else None)


# -- plan -------------------------------------------------------------------------------------


@main.command()
@click.option("--bundle", default=None, help="bundle folder (default: SmolLM2-135M LoRA)")
@click.option("--device", required=True, help="device profile: name, family or YAML path")
@click.option("--batch-size", type=int, default=None, help="default: the bundle's recipe")
@click.option("--max-length", type=int, default=64, show_default=True)
@click.option(
    "--micro-batch-size", type=int, default=None, help="default: the profile's max_batch_size"
)
@click.option(
    "--eval-batch-size",
    type=int,
    default=None,
    help="held-out (and prefix-caching) batch; default: the bundle's recipe",
)
@click.option("--momentum", type=float, default=None, help="default: per trainable mode")
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adam", "sign", "hizoo"]),
    default="sgd",
    show_default=True,
    help="adam keeps two θ-sized buffers, hizoo two beside its momentum",
)
@click.option("--perturbation", type=click.Choice(["auto", "copy", "inplace"]), default="auto")
@click.option(
    "--no-dry-run", is_flag=True, help="analytic estimate only (no child process loading the model)"
)
@click.option(
    "--data",
    "data_files",
    multiple=True,
    help="JSONL data of the run (repeatable: training and held-out): its frozen-prefix rows "
    "are counted",
)
@click.option(
    "--cache-prefix-mb",
    type=float,
    default=None,
    help="the run's cache_prefix_mb (default: the config default): rows past it go to disk",
)
@click.option(
    "--no-cache-prefix",
    is_flag=True,
    help="plan a run with cache_prefix=false (every evaluation on the full graph)",
)
@click.option(
    "--vocab-subset",
    type=int,
    default=None,
    help="the run's vocab_subset (default: the config default; 0: whole vocabulary)",
)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@friendly_errors
def plan(
    bundle,
    device,
    batch_size,
    max_length,
    micro_batch_size,
    eval_batch_size,
    momentum,
    optimizer,
    perturbation,
    no_dry_run,
    data_files,
    cache_prefix_mb,
    no_cache_prefix,
    vocab_subset,
    as_json,
):
    """Estimate fine-tuning's peak memory on a device profile; say what to change if it does
    not fit. Exit status 1 when it does not fit.

    A bundle with a frozen-prefix split is planned as the run that caches it: the prefix
    session while it computes the rows, then the suffix and vocabulary-subset sessions that
    the ZO steps run (each measured by a dry run). Give the run's --data (training file
    first) to count its rows and its vocabulary subset."""
    import json

    from ..bundle import load_bundle
    from ..config import FinetuneConfig
    from ..defaults import ensure_default_bundle
    from ..device.plan import make_plan, recipe_of, run_settings, vocab_rows_for
    from ..device.resolve import load_profile

    defaults = {k: f.default for k, f in FinetuneConfig.__dataclass_fields__.items()}
    profile = load_profile(device)
    b = load_bundle(bundle or ensure_default_bundle(click.echo))
    recipe = recipe_of(b)
    buffers, inplace = run_settings(b, momentum, perturbation, optimizer)
    lengths = train = None
    if data_files:
        from ..data import read_jsonl, tokenize_for

        sets = [
            tokenize_for(b.manifest, read_jsonl(f), b.tokenizer(), max_length) for f in data_files
        ]
        train = sets[0]
        lengths = [len(e.input_ids) for examples in sets for e in examples]
        if cache_prefix_mb is None:
            cache_prefix_mb = defaults["cache_prefix_mb"]
    cache_prefix = defaults["cache_prefix"] and not no_cache_prefix
    result = make_plan(
        b,
        profile,
        batch_size=batch_size or recipe["batch_size"],
        max_length=max_length,
        micro_batch=micro_batch_size,
        optim_buffers=buffers,
        inplace=inplace,
        dry_run=not no_dry_run,
        data_lengths=lengths,
        cache_prefix_mb=cache_prefix_mb,
        cache_prefix=cache_prefix,
        eval_batch=eval_batch_size or recipe["eval_batch_size"],
        vocab_rows=vocab_rows_for(b, vocab_subset, train=train) if cache_prefix else 0,
    )
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.report())
    if not result.fits or max_length > profile.max_seq_len:
        sys.exit(1)


# -- eval -------------------------------------------------------------------------------------


@main.command("eval")
@click.option("--bundle", default=None, help="bundle folder (default: SmolLM2-135M LoRA)")
@click.option("--data", required=True, help="JSONL data to score")
@click.option(
    "--tensors",
    default=None,
    type=click.Path(),
    help="trained.safetensors of a run (default: the bundle's initial values)",
)
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(),
    help="a run folder: its bundle and trained tensors",
)
@click.option("--max-length", default=64, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu")
@friendly_errors
def eval_cmd(bundle, data, tensors, run_dir, max_length, batch_size, provider):
    """Mean per-example loss of a bundle (optionally with trained tensors) on a data file;
    classification bundles also report accuracy."""
    from pathlib import Path

    from ..evaluate import evaluate

    if run_dir is not None and tensors is None and not (Path(run_dir) / "ledger.jsonl").is_file():
        raise EdgezoError(
            f"--run {run_dir} holds no run (no ledger.jsonl)", "pass the folder of a run"
        )
    if run_dir is not None and tensors is None:
        trained = Path(run_dir) / "trained.safetensors"
        if not trained.is_file():
            raise EdgezoError(
                f"run {run_dir} has no {trained.name} yet: it was stopped before it finished",
                f"continue it (edgezo finetune --resume --out {run_dir}), or rebuild its tensors "
                f"so far (edgezo replay --run {run_dir} --out T.safetensors) and pass --tensors T",
            )
    result = evaluate(
        bundle=bundle,
        data=data,
        tensors=tensors,
        run_dir=run_dir,
        max_length=max_length,
        batch_size=batch_size,
        provider=provider,
    )
    if result["accuracy"] is None:
        click.echo(
            f"loss {result['loss']:.4f} on {result['examples']} examples "
            f"(perplexity {result['perplexity']:.2f})"
        )
    else:
        click.echo(
            f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.1%} on "
            f"{result['examples']} examples ({result['task']})"
        )


# -- generate ---------------------------------------------------------------------------------


@main.command("generate")
@click.option("--bundle", default=None, help="bundle folder (default: the run's, or SmolLM2-135M)")
@click.option(
    "--run",
    "run_dir",
    default=None,
    type=click.Path(),
    help="a run folder: its bundle and trained tensors",
)
@click.option(
    "--tensors",
    default=None,
    type=click.Path(),
    help="trained.safetensors (default: the run's, else the bundle's initial values)",
)
@click.option("--prompt", required=True, help="text to continue")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy")
@click.option("--top-k", default=None, type=int, help="sample among the k most likely tokens")
@click.option("--top-p", default=None, type=float, help="nucleus sampling threshold")
@click.option("--seed", default=0, show_default=True, help="sampling seed")
@click.option(
    "--max-length",
    default=256,
    show_default=True,
    help="longest prefix fed to the model (older tokens are dropped)",
)
@click.option(
    "--compare", is_flag=True, help="also print the continuation with the bundle's initial tensors"
)
@click.option(
    "--chat",
    is_flag=True,
    help="wrap the prompt in the tokenizer's chat template (Instruct models)",
)
@click.option(
    "--stop", multiple=True, help="stop before this text (repeat for several stop strings)"
)
@click.option(
    "--kv-cache/--no-kv-cache",
    default=None,
    help="use the bundle's decoding graph [default: when the bundle has one]",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu")
@friendly_errors
def generate_cmd(
    bundle,
    run_dir,
    tensors,
    prompt,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    max_length,
    compare,
    chat,
    stop,
    kv_cache,
    provider,
):
    """Continue --prompt with the personalised tensors, printed token by token (a KV cache
    when the bundle has a decoding graph; see docs/guides/generate.md)."""
    import numpy as np

    from ..generate import TextGenerator, resolve
    from ..runner import RuntimeOptions

    b, tensors = resolve(bundle, tensors, run_dir)
    gen = TextGenerator(b, RuntimeOptions(provider=provider), kv_cache=kv_cache)
    for note in gen.notes:
        click.echo(f"note: {note}", err=True)

    def run(t):
        gen.load(t)
        pieces = gen.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            np.random.default_rng(seed),
            max_length=max_length,
            stop=stop,
            chat=chat,
        )
        for piece in pieces:
            click.echo(piece, nl=False)
        click.echo()

    if compare:
        click.echo(f"trained ({tensors or 'initial tensors'}):")
    run(tensors)
    if compare:
        click.echo(f"initial (bundle {b.path}):")
        run(None)


# -- replay -----------------------------------------------------------------------------------


@main.command()
@click.option(
    "--run", "run_dir", required=True, type=click.Path(), help="run folder holding ledger.jsonl"
)
@click.option("--bundle", default=None, help="bundle folder (default: the ledger header's)")
@click.option("--out", required=True, type=click.Path(), help="safetensors file to write")
@click.option("--upto", type=int, default=None, help="replay only the first N steps")
@click.option("--check", is_flag=True, help="compare with the run's trained.safetensors")
@friendly_errors
def replay(run_dir, bundle, out, upto, check):
    """Rebuild trained tensors from the bundle and a run's ledger, bit for bit, no forwards."""
    from pathlib import Path

    import numpy as np

    from ..bundle import load_bundle
    from ..errors import BundleError
    from ..zo.checkpoint import load_checkpoint, load_tensors, save_tensors_atomic
    from ..zo.ledger import Ledger

    run = Path(run_dir)
    ledger = Ledger.read(run / "ledger.jsonl")
    b = load_bundle(bundle or ledger.header["bundle_path"])
    engine = b.replay(ledger, upto=upto)
    steps = len(ledger.records) if upto is None else upto
    save_tensors_atomic(
        out, engine.params.state_dict(), metadata={"bundle": b.fingerprint, "step": str(steps)}
    )
    click.echo(f"replayed {steps} steps -> {out}")
    if not check:
        return
    trained, ckpt = run / "trained.safetensors", run / "checkpoint.safetensors"
    if trained.is_file():
        fix = f"rebuild it: edgezo replay --run {run} --out {trained}"
        theirs, meta = load_tensors(trained, "trained tensors", fix, BundleError)
        if meta.get("step", str(steps)) != str(steps):
            raise EdgezoError(
                f"{trained} holds the tensors after step {meta['step']}, the replay stopped "
                f"at {steps}",
                f"compare the same step: --upto {meta['step']}, or drop --upto",
            )
        if not b.recorded_by(meta.get("bundle", b.fingerprint), str(trained)):
            raise EdgezoError(f"{trained} was trained on another bundle", fix)
        mine = engine.params.state_dict()
        same = set(theirs) == set(mine) and all(np.array_equal(theirs[k], mine[k]) for k in mine)
        what = "the run's trained tensors"
    elif ckpt.is_file():  # a run killed or stopped before its end
        theirs, at = load_checkpoint(ckpt, b.fingerprint)
        if at != steps:
            engine = b.replay(ledger, upto=at)
        mine = {"master": engine.params.master, **engine.optimizer.state()}
        same = all(np.array_equal(theirs[k], mine.get(k)) for k in theirs)
        what = f"the run's checkpoint at step {at} (θ and optimiser state; no {trained.name} yet)"
    else:
        raise EdgezoError(
            f"{run} has no {trained.name} and no checkpoint to compare with (the run stopped "
            "before its first checkpoint)",
            f"drop --check, or continue the run first: edgezo finetune --resume --out {run}",
        )
    click.echo(f"bit-identical to {what}" if same else f"DIFFERS from {what}")
    if not same:
        sys.exit(1)


main.add_command(devices)
federate.callback = friendly_errors(federate.callback)
main.add_command(federate)

if __name__ == "__main__":
    main()

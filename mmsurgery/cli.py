"""The `mmsurgery` command line: each command parses, calls one library function, and renders the result.

Errors from the library (`MMSurgeryError`) become one red line on stderr and their exit code (2: bad input or
usage; 1: a failed check). `--debug` shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mmsurgery import __version__
from mmsurgery.checkpoint.dtypes import FOLD_DTYPES
from mmsurgery.errors import BadInputError, MMSurgeryError, one_line
from mmsurgery.paired_format import SCALE_MODES

__all__ = ["app", "fold", "inspect", "main", "pair", "verify"]

app = typer.Typer(
    name="mmsurgery",
    help="Cross-modal weight surgery (Multimodal Pathway) on transformer checkpoints.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state = {"debug": False}


def _stdout() -> Console:
    """Tables keep their full width when piped or captured (rich would assume 80 columns)."""
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        print(f"mmsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


PathArg = Annotated[
    Path, typer.Argument(help="A .safetensors file, a sharded index or its folder, a .pt/.pth/.bin, or a DCP folder.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", help="Take the state dict from this entry of a pickle or DCP folder ('a/b' for nesting)."),
]


def _choices(*values: str) -> Any:
    """Shell completion for an option with fixed values (`mmsurgery --install-completion`)."""
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


def _out_option(help_text: str) -> Any:
    """`-o/--out` as a str, not a Path: a trailing "/" (write into a new folder) must survive parsing."""
    return Annotated[str | None, typer.Option("-o", "--out", help=help_text)]


@app.command()
def inspect(
    path: PathArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the documented JSON form on stdout.")] = False,
    key: KeyOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw λ per layer of a paired checkpoint to a PNG (matplotlib).")
    ] = None,
) -> None:
    """Show what a checkpoint holds: format, stacks, widths, linear roles, dtypes; λ per layer when paired."""
    from mmsurgery.describe import describe

    result = describe(path, key=key)
    if plot is not None:
        from mmsurgery.plotting import plot_scales

        plot_scales(result, plot)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    from mmsurgery import render

    _stdout().print(render.description(result))


@app.command()
def pair(
    target: Annotated[Path, typer.Argument(help="The model to improve (e.g. a ViT checkpoint).")],
    aux: Annotated[
        list[Path],
        typer.Argument(help="The auxiliary model(s) of other modalities; several give W + Σₖ λₖ·W_auxₖ."),
    ],
    out: _out_option(
        "Paired output: a .safetensors file or a folder (default: <target stem>.paired.safetensors beside it; "
        "for a model folder with config.json, the model folder <target>.paired/)."
    ) = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan and the summary counts as JSON.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and report; write nothing.")] = False,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Roles to pair, comma-separated: qkv,q,k,v,attn_out,mlp_in,mlp_out.")
    ] = None,
    depth: Annotated[
        list[str] | None,
        typer.Option(
            "--depth",
            help="stretch (default), first, last or index; once for all auxiliaries or once per auxiliary.",
            autocompletion=_choices("stretch", "first", "last", "index"),
        ),
    ] = None,
    map_file: Annotated[
        list[Path] | None,
        typer.Option("--map", help="JSON file of explicit block/linear pairings; once, or once per auxiliary."),
    ] = None,
    target_stack: Annotated[str | None, typer.Option("--target-stack", help="Target stack prefix.")] = None,
    aux_stack: Annotated[
        list[str] | None, typer.Option("--aux-stack", help="Aux stack prefix; once, or once per auxiliary.")
    ] = None,
    target_key: Annotated[str | None, typer.Option("--target-key", help="Wrapper entry of a target pickle.")] = None,
    aux_key: Annotated[
        list[str] | None, typer.Option("--aux-key", help="Wrapper entry of an aux pickle; once, or once per auxiliary.")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Any skipped linear is an error.")] = False,
    init_scale: Annotated[float, typer.Option("--init-scale", help="Initial λ of every pathway.")] = 0.0,
    scale: Annotated[
        str,
        typer.Option(
            "--scale",
            help="λ per-linear (default, the paper's code), per-qkv (one per q/k/v chunk of a fused qkv) or "
            "per-channel (one per output channel).",
            autocompletion=_choices(*SCALE_MODES),
        ),
    ] = "per-linear",
    heads: Annotated[int | None, typer.Option("--heads", help="Attention heads of a ViT target (metadata).")] = None,
    shard_size: Annotated[str | None, typer.Option("--shard-size", help="Shard the output, e.g. 2GB (bytes).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar (it is drawn only on a terminal, for long jobs).")
    ] = False,
) -> None:
    """Align TARGET's block linears with AUX's and write a paired checkpoint (W, W_aux and λ per linear; with
    several AUX, one W_aux and λ per auxiliary)."""
    from mmsurgery import render
    from mmsurgery.pairing import pair as run_pair

    with render.byte_progress("pair", quiet=quiet or dry_run) as on_progress:
        result = run_pair(
            target,
            aux,
            out,
            roles=[r.strip() for r in layers.split(",") if r.strip()] if layers else None,
            depth=depth or "stretch",
            map_file=map_file or None,
            target_stack=target_stack,
            aux_stack=aux_stack or None,
            target_entry=target_key,
            aux_entry=aux_key or None,
            strict=strict,
            init_scale=init_scale,
            scale=scale,
            heads=heads,
            force=force,
            shard_size=shard_size,
            dry_run=dry_run,
            on_progress=on_progress,
        )
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    written = result.written.result if result.written else None
    _stdout().print(render.plans(result.plans, result.output, written, vit=result.vit))


@app.command()
def fold(
    paired: Annotated[Path, typer.Argument(help="A (trained) paired checkpoint: safetensors, sharded, or .pt.")],
    out: _out_option(
        "Plain output: a .safetensors file or a folder (default: <stem>.plain.safetensors beside it; for a model "
        "folder with config.json, the model folder <name>.plain/, x.paired/ giving x.plain/)."
    ) = None,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="keep, float32, bfloat16 or float16.",
            autocompletion=_choices(*FOLD_DTYPES),
        ),
    ] = "keep",
    shard_size: Annotated[str | None, typer.Option("--shard-size", help="Shard the output, e.g. 2GB (bytes).")] = None,
    key: KeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    source_hash: Annotated[
        bool,
        typer.Option(
            "--source-hash/--no-source-hash",
            help="Record PAIRED's sha256 in the output's metadata (verify then checks it); costs one sha256 pass "
            "over PAIRED (~1.6 GB/s per core), on a fast disk more than the fold itself.",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar (it is drawn only on a terminal, for long jobs).")
    ] = False,
    certificate: Annotated[
        Path | None,
        typer.Option(
            "--certificate",
            help="Also write a fold certificate here (PAIRED's sha256 and every output tensor's), for "
            "`verify PLAIN --certificate` where PAIRED is not. Costs one sha256 pass over PAIRED.",
        ),
    ] = None,
) -> None:
    """Fold every pathway into a plain weight, W + λ·W_aux, streaming; the output has the plain model's keys."""
    from mmsurgery import render
    from mmsurgery.fold import fold_file

    with render.byte_progress("fold", quiet=quiet) as on_progress:
        result = fold_file(
            paired,
            out,
            dtype=dtype,
            shard_size=shard_size,
            force=force,
            key=key,
            on_progress=on_progress,
            source_hash=source_hash,
            certificate=certificate,
        )
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    _stdout().print(render.fold_result(result))


ONNX_AUTO = "auto"  # what a bare `--onnx` becomes (see `_bare_onnx`)


@app.command()
def verify(
    plain: Annotated[Path, typer.Argument(help="The plain (folded) checkpoint to gate.")],
    against: Annotated[
        Path | None,
        typer.Option("--against", help="The trained paired checkpoint PLAIN was folded from (runs the fold stage)."),
    ] = None,
    onnx: Annotated[
        str | None,
        typer.Option(
            "--onnx",
            metavar="[FILE.onnx]",
            help="Check the ONNX graph. Alone: export PLAIN to a temp dir. --onnx FILE.onnx: an existing file is "
            "taken as is, a new path is exported there and kept.",
        ),
    ] = None,
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="vit (built-in), hf (the Hugging Face model of the config.json next to PLAIN, else next to "
            "PAIRED) or package.module:factory.",
        ),
    ] = "vit",
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs", help="Safetensors file with a batch-first tensor 'input'; batches are its first rows."
        ),
    ] = None,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="At least two batch sizes to compare at, comma-separated.")
    ] = "1,4",
    atol: Annotated[float | None, typer.Option("--atol", help="Absolute tolerance (default: per dtype).")] = None,
    rtol: Annotated[float | None, typer.Option("--rtol", help="Relative tolerance (default: per dtype).")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report (schema mmsurgery.verify/1) to this file.")
    ] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report to this file.")] = None,
    max_latency_ratio: Annotated[
        float | None,
        typer.Option("--max-latency-ratio", help="Fail when PLAIN's ORT latency / the reference's exceeds this."),
    ] = None,
    heads: Annotated[int | None, typer.Option("--heads", help="Attention heads of a built-in ViT.")] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset of the exported graphs.")] = 20,
    weights_ulps: Annotated[
        int,
        typer.Option(
            "--weights-ulps",
            help="Weights stage: allow N units in the last place per element (default 0: bit-identical). For "
            "folds made by other tools, which may round differently.",
        ),
    ] = 0,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help="Run only these stages, comma-separated (weights,keys,fold,onnx,cost,latency); the rest are "
            "reported as skipped.",
        ),
    ] = None,
    export_cache: Annotated[
        Path | None,
        typer.Option(
            "--export-cache",
            help="Folder of ONNX exports keyed by what shapes the graph: a repeated gate of the same architecture "
            "binds PLAIN's weights to a cached graph instead of exporting again.",
        ),
    ] = None,
    certificate: Annotated[
        Path | None,
        typer.Option(
            "--certificate",
            help="A fold certificate: an existing one gates PLAIN without PAIRED (or, with --against, is "
            "cross-checked with it); a new path with --against is written after a passing gate.",
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            "--memory-limit",
            help="Memory the gate may use (e.g. 8G), instead of what the machine reports as available; a gate "
            "estimated above it is refused before it starts.",
        ),
    ] = None,
) -> None:
    """Gate a folded checkpoint: weights and fold (vs --against), keys, ONNX Runtime (--onnx), cost and latency
    vs a plain reference. Exit 0: every stage passed or was skipped; 1: a check failed; 2: bad input or usage."""
    from mmsurgery.verify import verify as run_verify
    from mmsurgery.verify.report import check_output_path

    for out in (json_out, junit):
        if out is not None:
            check_output_path(out)
    report = run_verify(
        plain,
        against=against,
        onnx=True if onnx == ONNX_AUTO else onnx,
        arch=arch,
        inputs=inputs,
        batch_sizes=batch_sizes,
        atol=atol,
        rtol=rtol,
        max_latency_ratio=max_latency_ratio,
        heads=heads,
        opset=opset,
        weights_ulps=weights_ulps,
        stages=stages,
        export_cache=export_cache,
        memory_limit=memory_limit,
        certificate=certificate,
    )
    from mmsurgery import render

    _stdout().print(render.verify_report(report))  # first: a report file that cannot be written loses no result
    for out, write in ((json_out, report.write_json), (junit, report.write_junit)):
        if out is not None:
            try:
                write(out)
            except OSError as e:
                raise BadInputError(f"{out}: cannot write the report ({e.strerror or type(e).__name__})") from None
    if not report.passed:
        raise typer.Exit(1)


def _bare_onnx(args: list[str]) -> list[str]:
    """`--onnx` takes an optional value: alone (last, or followed by an option or by a token not ending in
    `.onnx`, such as PLAIN) it becomes `--onnx=auto`, i.e. export to a temp dir."""
    out: list[str] = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == "--onnx" and (following is None or following.startswith("-") or not following.endswith(".onnx")):
            out.append(f"--onnx={ONNX_AUTO}")
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and, run as a script, exits with) the exit code."""
    args = _bare_onnx(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="mmsurgery")  # standalone: usage errors print usage and exit 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MMSurgeryError as e:
        if debug:
            raise
        return _report(str(e), e.exit_code)
    except OSError as e:  # the environment refused a path (too long a name, no permission, a full disk): input
        if debug or e.errno not in _ENVIRONMENT_ERRNOS:
            return _internal(e, debug)
        where = f"{e.filename}: " if e.filename is not None else ""
        return _report(f"{where}{e.strerror or type(e).__name__}", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line, and a way to see more
        return _internal(e, debug)
    return 0


_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        *("ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG", "ELOOP", "EACCES", "EPERM", "EROFS"),
        *("ENOSPC", "EDQUOT", "EFBIG", "EMFILE", "ENFILE", "EEXIST", "EXDEV", "EIO", "EBUSY", "ETXTBSY"),
    )
    if hasattr(errno, name)
)


def _report(message: str, code: int) -> int:
    """One escaped line on stderr (`render.print_error`), and the exit code."""
    from mmsurgery.render import print_error

    print_error(Console(stderr=True, soft_wrap=True), message)
    return code


def _internal(e: BaseException, debug: bool) -> int:
    """A bug: exit 3 with one escaped line, or the traceback under --debug."""
    if debug:
        raise e
    from mmsurgery.render import escape_controls

    print(
        escape_controls(f"internal error: {type(e).__name__}: {one_line(str(e))} (run with --debug for the traceback)"),
        file=sys.stderr,
    )
    return 3


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()

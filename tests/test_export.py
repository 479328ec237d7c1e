"""`python -m gxpo.export`: a run's checkpoint as a Hugging Face directory whose logits in
transformers are gxpo's, as a PEFT adapter that peft puts on the exported base, and one clear
error per bad input."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from tiny_runs import ROOT, make_run

from gxpo.export import export
from gxpo.models.char_tokenizer import char_tokenizer
from gxpo.models.presets import get_preset
from gxpo.models.transformer import forward

# Parity in float32 (the issue's bound): these 2-layer models' logits are O(1).
ATOL = 1e-4
TEXT = "What is 3 + 5? Put the answer in \\boxed{}. The answer is \\boxed{8}."


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    return workdir, make_run(workdir, lora_rank=4, steps=(1, 2))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full_run")
    return workdir, make_run(workdir, lora_rank=0, steps=(1,))


def _ours(weights: dict, lora_rank: int, ids: np.ndarray) -> np.ndarray:
    config = get_preset("tiny", dtype="float32", lora_rank=lora_rank, lora_alpha=8.0)
    return np.asarray(forward(weights, config, jnp.asarray(ids)))


def _theirs(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _ids() -> np.ndarray:
    return np.asarray(char_tokenizer()(TEXT)["input_ids"], np.int64)[None]


def test_merged_export_of_a_step_has_gxpo_logits_in_transformers(lora_run, tmp_path):
    workdir, weights = lora_run
    out = export(workdir, tmp_path / "merged", step=1)
    ids = _ids()
    theirs = _theirs(_load(out), ids)
    assert np.abs(theirs - _ours(weights[1], 4, ids)).max() < ATOL
    # The other checkpoint differs by far more: the export is of step 1, adapters folded in.
    assert np.abs(theirs - _ours(weights[2], 4, ids)).max() > 100 * ATOL
    # The run's tokenizer and every id that ends a reply.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    chat = [{"role": "user", "content": "2 + 2?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        char_tokenizer().apply_chat_template(chat, tokenize=False)
    )
    # Readable by transformers 4 and vLLM too: a class they know, the template inside.
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["chat_template"] == char_tokenizer().chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [0, 2]


def test_peft_export_loads_onto_the_exported_base(lora_run, tmp_path):
    workdir, weights = lora_run
    out = export(workdir, tmp_path / "adapter", format="peft")  # the latest step: 2
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    # A random-init base is not on disk anywhere: the export writes it, adapters off.
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())
    ids = _ids()
    base = _load(out / "base")
    base_logits = _theirs(base, ids)
    tuned = _theirs(peft.PeftModel.from_pretrained(base, str(out)).eval(), ids)
    assert np.abs(tuned - _ours(weights[2], 4, ids)).max() < ATOL
    assert np.abs(tuned - base_logits).max() > 100 * ATOL  # the adapters matter


def test_full_fine_tuning_exports_merged_and_refuses_peft(full_run, tmp_path):
    workdir, weights = full_run
    out = export(workdir, tmp_path / "merged")
    ids = _ids()
    assert np.abs(_theirs(_load(out), ids) - _ours(weights[1], 0, ids)).max() < ATOL
    with pytest.raises(ValueError, match=r"lora_rank=0.*use --format=merged"):
        export(workdir, tmp_path / "adapter", format="peft")


def test_bad_inputs_raise_one_clear_error(lora_run, tmp_path):
    workdir, _ = lora_run
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        export(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        export(tmp_path, tmp_path / "out")
    fresh = tmp_path / "fresh"  # a run that has not saved yet
    fresh.mkdir()
    (fresh / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint"):
        export(fresh, tmp_path / "out")
    with pytest.raises(
        ValueError, match=r"no checkpoint of step 7 \(--step\); its steps: \[1, 2\]"
    ):
        export(workdir, tmp_path / "out", step=7)
    with pytest.raises(ValueError, match=r"--format='onnx'"):
        export(workdir, tmp_path / "out", format="onnx")
    with pytest.raises(ValueError, match=r"the run's own work directory"):
        export(workdir, workdir)
    assert not (tmp_path / "out").exists()  # every error came before any writing


def test_cli_prints_a_users_error_as_one_line(full_run, tmp_path):
    workdir, _ = full_run
    proc = subprocess.run(
        [sys.executable, "-m", "gxpo.export", f"--workdir={workdir}", f"--out={tmp_path}/a"]
        + ["--format=peft"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --format=peft: the run in"), lines

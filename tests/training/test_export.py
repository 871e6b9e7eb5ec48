import json
import os
import shutil
import subprocess
import sys

import torch
from PIL import Image

from colintern.training.export import merge_adapter
from colintern.training.trainer import train

from tests.conftest import REPO_ROOT
from tests.training.test_trainer import small_run

EMBED = (
    "import sys, torch\n"
    "from PIL import Image\n"
    "from colintern.model.modeling import ColIntern3_5\n"
    "from colintern.model.loading import load_processor\n"
    "from colintern.model.encoding import encode_pages, encode_queries\n"
    "model = ColIntern3_5.from_pretrained(sys.argv[1]).eval()\n"
    "processor = load_processor(sys.argv[1])\n"
    "pages = [Image.new('RGB', (128, 176), c) for c in ('red', 'teal')]\n"
    "assert type(model).__name__ == 'ColIntern3_5' and not any('lora' in k for k in model.state_dict())\n"
    "torch.save({'pages': encode_pages(model, processor, pages, storage_dtype=torch.float32),\n"
    "            'queries': encode_queries(model, processor, ['a red header', ''], storage_dtype=torch.float32)},\n"
    "           sys.argv[2])\n"
)


def test_merged_export_loads_without_peft_and_matches_base_plus_adapter(colintern_home, small_synthdocs_dir, tmp_path):
    from colintern.model.loading import load_retriever
    from colintern.model.encoding import encode_pages, encode_queries

    run = train(small_run(tmp_path, small_synthdocs_dir, max_steps=3))
    merged = merge_adapter(run.output_dir, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and (merged / "README.md").is_file()
    assert not (merged / "adapter_config.json").exists()
    card = (merged / "README.md").read_text()
    assert "| LoRA | r=4, alpha=8, dropout=0.1 |" in card

    # base + adapter, in this process
    model, processor = load_retriever(str(run.output_dir), device="cpu", merge=False)
    pages = [Image.new("RGB", (128, 176), c) for c in ("red", "teal")]
    expected = encode_pages(model, processor, pages, storage_dtype=torch.float32) + encode_queries(
        model, processor, ["a red header", ""], storage_dtype=torch.float32)

    # the merged checkpoint, in a fresh process, through the plain model class
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", EMBED, str(merged), str(tmp_path / "merged.pt")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = torch.load(tmp_path / "merged.pt")
    for a, b in zip(expected, fresh["pages"] + fresh["queries"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- output folder
def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merging_into_a_folder_of_other_exports_needs_overwrite_and_keeps_them(tiny_adapter_dir, tmp_path):
    # found: `merge_adapter.py --output-dir exports/` replaced the whole folder (the other exports were gone)
    import pytest

    from colintern.utils import OUTPUT_RECORD, ColinternError

    exports = tmp_path / "exports"
    (exports / "older-model").mkdir(parents=True)
    (exports / "older-model" / "model.safetensors").write_bytes(b"an earlier export")
    (exports / "notes.md").write_text("which export is which")
    before = _files(exports)
    with pytest.raises(ColinternError, match=r"exports is not empty .*--overwrite"):
        merge_adapter(tiny_adapter_dir, exports)
    assert _files(exports) == before

    merged = merge_adapter(tiny_adapter_dir, exports, overwrite=True)
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert {k: v for k, v in _files(exports).items() if k in before} == before  # the user's files untouched
    written = set(json.loads((exports / OUTPUT_RECORD).read_text())["written_by"]["merge_adapter"])
    assert {"model.safetensors", "config.json", "README.md"} <= written and not written & set(before)
    assert not [p for p in exports.iterdir() if p.name.endswith(".partial")]

    stamp = (exports / "model.safetensors").stat().st_mtime_ns
    merge_adapter(tiny_adapter_dir, exports, overwrite=True)  # its own files: replaced
    assert (exports / "model.safetensors").stat().st_mtime_ns != stamp
    assert {k: v for k, v in _files(exports).items() if k in before} == before


def test_overwrite_never_replaces_a_file_merge_did_not_write(tiny_adapter_dir, tmp_path):
    import pytest

    from colintern.utils import ColinternError

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own README")
    with pytest.raises(ColinternError, match=r"out/README.md was not written by merge_adapter"):
        merge_adapter(tiny_adapter_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert (out / "README.md").read_text() == "my own README"


def test_merging_into_the_run_folder_is_refused_and_the_run_is_kept(tiny_adapter_dir, tmp_path, capsys):
    # found: `--output-dir RUN` replaced the run: adapter, checkpoints and trainer state gone
    from tests.pdf_fixtures import run_script_in_process

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter_dir, run)
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"a checkpoint")
    (run / "trainer_state.json").write_text("{}")
    before = _files(run)
    for target, extra in ((run, []), (run, ["--overwrite"]), (run / "merged", []), (tmp_path, ["--overwrite"])):
        code = run_script_in_process("scripts/merge_adapter.py", "--adapter", str(run), "--output-dir", str(target),
                                     *extra)
        err = capsys.readouterr().err
        assert code == 2, (target, extra)
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert f"--output-dir {target}" in line and f"--adapter {run}" in line
        assert _files(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

import os
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

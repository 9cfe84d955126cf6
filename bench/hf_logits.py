"""mpillama's float32 logits against Hugging Face transformers on the same weights.

    python bench/hf_logits.py --hf-python /path/to/venv/bin/python [--shapes tiny,qwen3-tiny,qwen3-moe-tiny]

transformers and torch are not dependencies of mpillama (the test suite checks the logits against
its own numpy reference, tests/reference.py). This is the check against the implementation users
compare with, run where a Python with both is at hand (e.g. `python -m venv hf && hf/bin/pip install
torch --index-url https://download.pytorch.org/whl/cpu && hf/bin/pip install transformers numpy`).

Per shape: `synth --type f32` writes the GGUF, `formats.hf.write_hf` the same weights as a Hugging Face
folder (config.json + safetensors); mpillama generates 32 greedy tokens from that folder on one rank
(`--weight-type f32`: no rounding anywhere) with `--dump-logits`; then, in --hf-python,
AutoModelForCausalLM (eager attention, float32) runs the prompt and those tokens in one forward pass
and its own greedy `generate`. Printed: the largest logit difference over all 32 steps as a fraction
of the largest logit, whether the greedy tokens agree, and whether transformers' own generation gives
the same tokens. Exit 1 if any shape differs by more than --tolerance (default 1e-4) or in a token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from mpillama.formats import open_model  # noqa: E402
from mpillama.formats.hf import write_hf  # noqa: E402
from mpillama.tokenizer import load_tokenizer  # noqa: E402

PROMPT = "The capital of France is"
STEPS = 32

HF_SIDE = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
folder, ids_file, logits_file = sys.argv[1:4]
meta = json.load(open(ids_file))
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
p = len(meta["prompt"])
with torch.no_grad():
    logits = model(torch.tensor([meta["prompt"] + meta["tokens"][:-1]])).logits[0, p - 1:].numpy()
    own = model.generate(torch.tensor([meta["prompt"]]), max_new_tokens=len(meta["tokens"]), do_sample=False)
np.save(logits_file, logits)
print(json.dumps({"class": type(model).__name__, "generated": own[0, p:].tolist()}))
"""


def check(shape: str, hf_python: str, folder: Path) -> dict:
    gguf = folder / f"{shape}-f32.gguf"
    subprocess.run([sys.executable, "-m", "mpillama", "synth", "--shape", shape, "--type", "f32", "--out", str(gguf)],
                   check=True, capture_output=True)
    hf = write_hf(open_model(gguf), folder / f"{shape}-hf", "f32")
    ours_file = folder / f"{shape}-ours.npy"
    done = subprocess.run([sys.executable, "-m", "mpillama", "generate", "--model", str(hf), "--tokenizer", str(gguf),
                           "--weight-type", "f32", "--prompt", PROMPT, "--steps", str(STEPS), "--ignore-eos",
                           "--dump-logits", str(ours_file)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shape}: mpillama generate failed: {done.stderr.strip()[-500:]}")
    ours = np.load(ours_file)
    meta = {"prompt": load_tokenizer(open_model(gguf), None).encode(PROMPT), "tokens": np.argmax(ours, 1).tolist()}
    ids_file, theirs_file = folder / f"{shape}-ids.json", folder / f"{shape}-hf.npy"
    ids_file.write_text(json.dumps(meta))
    done = subprocess.run([hf_python, "-c", HF_SIDE, str(hf), str(ids_file), str(theirs_file)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shape}: the transformers side failed: {done.stderr.strip()[-800:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = np.load(theirs_file)
    scale = float(np.abs(theirs).max())
    return {"shape": shape, "class": info["class"], "max_logit": scale,
            "max_difference": float(np.abs(ours - theirs).max()) / scale,
            "tokens_agree": np.argmax(theirs, 1).tolist() == meta["tokens"],
            "hf_generate_agrees": info["generated"] == meta["tokens"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-python", required=True, help="a Python with torch and transformers")
    p.add_argument("--shapes", default="tiny,qwen3-tiny,qwen3-moe-tiny")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest logit difference / largest logit")
    args = p.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            r = check(shape, args.hf_python, Path(tmp))
            good = r["max_difference"] <= args.tolerance and r["tokens_agree"] and r["hf_generate_agrees"]
            ok &= good
            print(f"{shape:16s} {r['class']:22s} {STEPS} steps: max |difference| {r['max_difference']:.1e} of the "
                  f"largest logit ({r['max_logit']:.1f}); greedy tokens agree {r['tokens_agree']}; "
                  f"transformers' generate agrees {r['hf_generate_agrees']}{'' if good else '  <- FAILS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Check that a packed GIFT-SW export with no salient columns is a valid GPTQ (v1) checkpoint.

    python tools/check_gptq_interop.py PATH [--device cpu] [--rtol 1e-2]

1. Structure (always): quant_method gift_sw, no salient columns, one bits/group_size/sym for all linears, and no
   zero point equal to 0 (v1 stores zero - 1 and kernels add 1 back, so a stored 2**bits - 1 would be read as
   2**bits; our own loader reads it modulo 2**bits).
2. Loading (needs ``gptqmodel`` and ``optimum``): a temporary copy of the folder whose config says
   ``quant_method: gptq`` and whose shards hold only the GPTQ tensors is loaded with
   ``AutoModelForCausalLM.from_pretrained``; its fp16 logits on random tokens are compared with
   ``gift_quant.export.load_quantized``'s. Different kernels sum in different orders in fp16, hence a relative
   tolerance on max |Δlogit| / max |logit|.

3. Perplexity (``--ppl-windows N``, needs the same backend): WikiText-2 (``$GIFT_QUANT_DATA``) over N windows of
   2048 tokens, GPTQ protocol, for the GPTQ-loaded model and for ours (``from_pretrained`` through gift_sw), both in
   ``--dtype`` (gptqmodel's kernels take fp16/bf16).

Exit codes: 0 compatible and logits agree, 1 incompatible or logits differ, 2 structure fine but no GPTQ backend
installed (nothing to compare against).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gift_quant.checkpoint import INDEX, guard_keys  # noqa: E402
from gift_quant.hf_quantizer import load_quantized  # noqa: E402
from gift_quant.bitpack import unpack_zeros  # noqa: E402

GIFT_ONLY = (".salient_idx", ".salient_weight")


def shard_names(folder: Path) -> list[str]:
    if (folder / INDEX).is_file():
        return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    return ["model.safetensors"]


def structure_problems(folder: Path) -> tuple[dict, list[str]]:
    """The quantization_config and the reasons (if any) why GPTQ kernels would not read the tensors as we do."""
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "gift_sw":
        return qc, ["not a gift_sw export"]
    problems = []
    if qc.get("module_overrides"):
        problems.append(f"{len(qc['module_overrides'])} linears differ in bits/group_size/sym; GPTQ has one setting")
    for name in shard_names(folder):
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                if key.endswith(".salient_idx") and f.get_slice(key).get_shape()[0] > 0:
                    problems.append(f"{key.removesuffix('.salient_idx')} has salient columns")
                elif key.endswith(".qzeros"):
                    out_features = f.get_slice(key.replace(".qzeros", ".scales")).get_shape()[1]
                    if (unpack_zeros(f.get_tensor(key), qc["bits"], out_features) == 0).any():
                        problems.append(f"{key} holds a zero point of 0, which v1 kernels read as {2 ** qc['bits']}")
    return qc, problems


def gptq_view(folder: Path, qc: dict, tmp: Path) -> Path:
    """A copy of the export that transformers loads as GPTQ: GPTQ config, GIFT-only tensors dropped."""
    view = tmp / "gptq_view"
    view.mkdir()
    config = json.loads((folder / "config.json").read_text())
    names = qc["modules"]
    suffixes = sorted({n.split(".", 3)[3] for n in names if n.startswith("model.layers.")})
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": qc["bits"], "group_size": qc["group_size"], "sym": qc["sym"],
        "desc_act": qc["desc_act"], "checkpoint_format": "gptq", "true_sequential": True,
        "modules_in_block_to_quantize": [suffixes],
    }
    (view / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    guards = guard_keys(names)  # only there to stop a load without gift_quant
    for name in shard_names(folder):
        with safe_open(folder / name, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(GIFT_ONLY) and k not in guards}
        save_file(tensors, view / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if (folder / INDEX).is_file():
        (view / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for p in folder.iterdir():  # tokenizer and generation files
        if p.is_file() and not (view / p.name).exists() and p.name != "gift_quant_manifest.json":
            os.symlink(p.resolve(), view / p.name)
    return view


@torch.no_grad()
def compare(folder: Path, view: Path, device: str, seq: int) -> float:
    from transformers import AutoModelForCausalLM

    ours = load_quantized(folder, device=device, dtype=torch.float16)
    gptq = AutoModelForCausalLM.from_pretrained(view, device_map=device, dtype=torch.float16).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    a, b = ours(ids).logits.float(), gptq(ids).logits.float()
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"max |Δlogit| / max |logit| = {err:.2e} (max |Δ| = {(a - b).abs().max().item():.3e})")
    return err


@torch.no_grad()
def perplexities(folder: Path, view: Path, device: str, dtype: torch.dtype, windows: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gift_quant.config import TextSource
    from gift_quant.data import evaluation_ids, load_documents
    from gift_quant.evaluate import perplexity

    ids = evaluation_ids(AutoTokenizer.from_pretrained(folder), load_documents(TextSource(dataset="wikitext2")))
    models = {"gift_quant (gift_sw)": lambda: load_quantized(folder, device=device, dtype=dtype),
              "gptqmodel (gptq)": lambda: AutoModelForCausalLM.from_pretrained(view, device_map=device, dtype=dtype)}
    out = {}
    for name, load in models.items():
        result = perplexity(load().eval(), ids, 2048, windows, device=device, progress=False)
        out[name] = result.value
        print(f"{name}: WikiText-2 perplexity {result.value:.4f} ({result.windows} x 2048, {dtype}, "
              f"{result.seconds:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rtol", type=float, default=1e-2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--ppl-windows", type=int, default=0, help="also compare WikiText-2 perplexity over N windows")
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"], help="for the perplexity")
    args = p.parse_args(argv)

    qc, problems = structure_problems(args.path)
    for problem in problems:
        print(f"incompatible: {problem}")
    if problems:
        return 1
    print(f"structure: GPTQ v1 layout, {qc['bits']}-bit, group_size {qc['group_size']}, sym {qc['sym']}, "
          f"desc_act {qc['desc_act']}, {len(qc['modules'])} linears")
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped the logits comparison: {', '.join(missing)} not installed")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        view = gptq_view(args.path, qc, Path(tmp))
        err = compare(args.path, view, args.device, args.seq)
        if args.ppl_windows:
            perplexities(args.path, view, args.device, getattr(torch, args.dtype), args.ppl_windows)
    ok = err <= args.rtol
    print("logits agree" if ok else f"logits differ by more than rtol={args.rtol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

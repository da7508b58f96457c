"""llm-compressor's GPTQModifier (its defaults: static act order, block 128, damping 0.01) on ptq's calibration
ids; saves the dequantized fp32 checkpoint for `ptq eval`. Run by llm-compressor's own interpreter:

    PEER_PY bench/peer_runners/llmcompressor_runner.py --model DIR --ids IDS.json --bits 3 --group-size 64 --out OUT

After ``oneshot`` each quantized linear's weight holds its quantize-dequantize value (compression to packed
integers happens only at save), which is read back, checked (<= 2^bits levels per group) and saved.
"""
from __future__ import annotations

import time

import torch

from _common import check_levels, linear_names, load_ids, parser, save_fp


def main():
    args = parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_ids(args.ids)
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seqlen] * n})
    wargs = QuantizationArgs(num_bits=args.bits, type="int", symmetric=args.sym, strategy="group",
                             group_size=args.group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=wargs)},
                          ignore=["lm_head"])
    t = time.process_time()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    max_seq_length=seqlen, shuffle_calibration_samples=False) or model
    cpu = time.process_time() - t
    mods = dict(model.named_modules())
    weights = {name: mods[name].weight.detach().clone() for name in linear_names(model)}
    check_levels(weights, args.bits, args.group_size)
    save_fp(args.model, weights, args.out, {"tool": "llm-compressor", "version": llmcompressor.__version__,
                                            "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
                                            "nsamples": n, "seqlen": seqlen, "quantize_cpu_s": round(cpu, 1)})
    print(f"llm-compressor {llmcompressor.__version__}: {len(weights)} linears, {cpu:.0f} CPU s")


if __name__ == "__main__":
    main()

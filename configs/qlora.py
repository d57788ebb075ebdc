# QLoRA on the demo task: the frozen block linears stored in 4-bit NF4 (about 0.26x the
# bytes of bf16), LoRA adapters in fp32 on top, compute in bf16.
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/train.jsonl"]
val_data = "data/demo/val.jsonl"
test_data = "data/demo/test.jsonl"
out_dir = "runs/qlora"
method = "qlora"
lora_rank = 16
lora_alpha = 32.0
seq_len = 512
packing = "packed"
batch_size = 4
max_steps = 60
warmup_steps = 5
lr = 1e-3
min_lr = 1e-4
dtype = "auto"              # the faster of bfloat16 and float32 on this machine (see config.py)
eval_every = 20
save_every = 20

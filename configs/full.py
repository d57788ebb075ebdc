# Full fine-tuning of every parameter on the demo task: the most memory (fp32 weights,
# gradients and two AdamW moments for all 135M parameters), usually the lowest loss.
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/train.jsonl"]
val_data = "data/demo/val.jsonl"
test_data = "data/demo/test.jsonl"
out_dir = "runs/full"
method = "full"
seq_len = 512
packing = "packed"
batch_size = 4
max_steps = 60
warmup_steps = 5
lr = 5e-5                   # full fine-tuning wants a much smaller step than LoRA
min_lr = 5e-6
weight_decay = 0.01
dtype = "auto"              # the faster of bfloat16 and float32 on this machine (see config.py)
eval_every = 20
save_every = 20

# Layer-wise fine-tuning on the demo task: the bottom blocks frozen, only the top
# `train_layers` blocks (and the final norm and output head) train.
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/train.jsonl"]
val_data = "data/demo/val.jsonl"
test_data = "data/demo/test.jsonl"
out_dir = "runs/freeze"
method = "freeze"
train_layers = 4
train_head = True
seq_len = 512
packing = "packed"
batch_size = 4
max_steps = 60
warmup_steps = 5
lr = 1e-4
min_lr = 1e-5
dtype = "auto"              # the faster of bfloat16 and float32 on this machine (see config.py)
eval_every = 20
save_every = 20

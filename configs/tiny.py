# A tiny random model on the bundled example files: a smoke test of the whole pipeline in
# seconds. models/tiny is made when absent (python tools/get_model.py tiny).
model = "models/tiny"
train_data = ["data/examples/messages.jsonl", "data/examples/alpaca.jsonl"]
val_fraction = 0.2
out_dir = "runs/tiny"
method = "lora"
lora_rank = 4
lora_alpha = 8.0
seq_len = 128
batch_size = 2
grad_accum = 2
max_steps = 6
warmup_steps = 2
lr = 1e-3
eval_every = 3
save_every = 3
dtype = "float32"

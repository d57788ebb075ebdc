# Lesson 8: overfitting, validation loss and early stopping. 32 training examples, seen again and
# again (8 steps an epoch, 10 epochs), validated once an epoch on 100 examples it never sees.
#   python train.py --config configs/course/08_overfit.py
#   python train.py --config configs/course/08_overfit.py --early_stopping_patience=3 --out_dir=runs/course/08_early
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/course/train_32.jsonl"]
val_data = "data/course/val_100.jsonl"
test_data = "data/demo/test.jsonl"
out_dir = "runs/course/08_overfit"
method = "lora"
lora_rank = 16
lora_alpha = 32.0
seq_len = 256
packing = "none"            # one example per row: an epoch is exactly 32 / 4 = 8 steps
batch_size = 4
max_steps = 80
warmup_steps = 4
lr = 1e-3
min_lr = 1e-3               # constant after warmup: the decay would hide the overfitting
dtype = "auto"
eval_every = 8               # once an epoch
save_every = 40
early_stopping_patience = 0   # 0: run to the end, to see the whole curve

# Lesson 6: learning rate, warmup, batch size and gradient accumulation. The baseline run, swept:
#   python sweep.py --config configs/course/06_hparams.py --grid "lr=1e-4,1e-3,1e-2"
#   python sweep.py --config configs/course/06_hparams.py --grid "warmup_steps=0,10" --lr=1e-2 --out_dir=runs/course/06_warmup
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/train.jsonl"]
val_data = "data/course/val_100.jsonl"
out_dir = "runs/course/06_lr"
method = "lora"
lora_rank = 16
lora_alpha = 32.0
seq_len = 256
packing = "packed"
batch_size = 4
grad_accum = 1
max_steps = 40
warmup_steps = 4
lr = 1e-3
min_lr = 1e-4               # the cosine ends at min_lr; a sweep over lr keeps this fixed
dtype = "auto"
eval_every = 5              # a validation point every 5 steps: the curves are the result
save_every = 20

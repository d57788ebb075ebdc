# The course's baseline run (course/): LoRA on the demo task (customer message -> JSON ticket),
# sized to a few minutes on a 2-core laptop CPU. Lessons change one key at a time on the command
# line (--method=full, --template=alpaca, --train_data=...), so every difference is visible.
#   python train.py --config configs/course/baseline.py
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/train.jsonl"]      # 2,400 examples (tools/make_demo_data.py)
val_data = "data/course/val_100.jsonl"      # 100 held-out examples (course/make_course_data.py)
test_data = "data/demo/test.jsonl"          # for eval.py
out_dir = "runs/course/baseline"
method = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_targets = "all-linear"
seq_len = 256               # examples are 58-135 tokens: a packed row holds about 3
packing = "packed"
batch_size = 4              # 4 packed rows: about 1,000 tokens, 11 examples per step
grad_accum = 1
max_steps = 40              # about 440 examples, a fifth of an epoch
warmup_steps = 4
lr = 1e-3
min_lr = 1e-4
dtype = "auto"
eval_every = 10
save_every = 20
seed = 1337

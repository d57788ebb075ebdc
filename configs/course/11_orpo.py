# Lesson 11: ORPO from the base model, SFT and preference in one loss: the SFT loss on the chosen
# ticket plus orpo_lambda times the odds-ratio term. No reference model, no SFT run before it.
#   python train.py --config configs/course/11_orpo.py
model = "models/SmolLM2-135M-Instruct"
train_data = ["data/demo/preference_train.jsonl"]
val_data = "data/demo/preference_val.jsonl"         # the validation loss is the ORPO loss
test_data = "data/demo/test.jsonl"
out_dir = "runs/course/11_orpo"
objective = "orpo"
orpo_lambda = 0.5
method = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_targets = "all-linear"
seq_len = 256
packing = "none"
batch_size = 4              # pairs per micro-batch
grad_accum = 3              # 12 pairs a step: 480 in 40 steps, as many tickets as the SFT baseline sees
max_steps = 40
warmup_steps = 4
lr = 1e-3
min_lr = 1e-4
dtype = "auto"
eval_every = 10
eval_batches = 13
save_every = 20
seed = 1337

# Lesson 11: DPO after SFT. The model is the SFT run's merged weights (course/course.py 11 trains it:
# the baseline with --merge=True), and DPO's reference is that same model: the LoRA adapters off.
# The pairs are the demo task's: the right ticket against the same ticket with one field wrong.
#   python train.py --config configs/course/11_dpo.py
model = "runs/course/11_sft/merged"
train_data = ["data/demo/preference_train.jsonl"]   # 2,400 pairs (tools/make_demo_data.py)
val_data = "data/demo/preference_val.jsonl"         # 200 pairs: the validation loss is the DPO loss
test_data = "data/demo/test.jsonl"                  # for eval.py
out_dir = "runs/course/11_sft_dpo"
objective = "dpo"
dpo_beta = 0.1
method = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_targets = "all-linear"
seq_len = 256
packing = "none"            # one sequence per row: the chosen answers, then the rejected ones
batch_size = 4              # pairs per micro-batch: 8 sequences
grad_accum = 2
max_steps = 30              # 240 pairs, a tenth of the set
warmup_steps = 3
lr = 5e-4
min_lr = 5e-5
dtype = "auto"
eval_every = 10
eval_batches = 13           # about 50 validation pairs
save_every = 10
seed = 1337

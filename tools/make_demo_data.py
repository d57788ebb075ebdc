"""Write the demo task: customer-support messages -> one JSON ticket with a fixed schema.

    python tools/make_demo_data.py   # writes data/demo/{train,val,test}.jsonl and preference_{train,val}.jsonl

Every example is an OpenAI-style conversation (the "messages" format of data.py):

    system:    "Extract the support ticket as JSON." (INSTRUCTION; it replaces the default system prompt)
    user:      "hi team, my flux vacuum won't turn on anymore. order no. 48213. please help ASAP!"
    assistant: {"category":"technical","urgency":"high","product":"Flux Robot Vacuum","order_id":"#48213","sentiment":"neutral"}

The answer is compact JSON with the keys always in the order of FIELDS, so exact match is a fair
metric, and each field can be scored on its own (eval.py's json_field_accuracy).

Why this task: it has an objective answer, SmolLM2-135M-Instruct gets it wrong out of the box (it
writes prose, other keys, other values), and a few minutes of LoRA on a CPU teach it. Each field is
decided by the text alone, with cues a small model can pick up, wrapped in enough variety (many
phrasings, greetings, sign-offs, filler, distracting numbers, lowercase, typos) that it has to
read the message rather than memorize it:
    category   what the core sentence is about (a charge, a delivery, a fault, a login, a return)
    urgency    high / low when the message says so ("ASAP", "no rush"), else medium
    product    one of PRODUCTS, mentioned in full, by brand + kind, or lowercased; null if none
    order_id   "#" + the 5-digit order number however it is written ("order no. 48213"); else null
    sentiment  positive / negative when the writer says how they feel, else neutral

Deterministic (one seeded random.Random, pure Python) and license-clean: every template, product
name and sentence is written here; the products are made up.
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import ArgumentParser, check_out_folder, script  # noqa: E402

FIELDS = ("category", "urgency", "product", "order_id", "sentiment")

# Short on purpose: every prompt token costs training time (LoRA's backward pass runs through the
# whole sequence), and the schema is what the examples teach. It takes the system slot, which also
# keeps out the model's default system prompt (another ~20 tokens per example).
INSTRUCTION = "Extract the support ticket as JSON."

# Canonical name -> the short form a customer might write (brand + kind of thing).
PRODUCTS = {
    "Aurora Desk Lamp": "Aurora lamp",
    "Brio Electric Kettle": "Brio kettle",
    "Cirrus Air Purifier": "Cirrus purifier",
    "Drift Wireless Earbuds": "Drift earbuds",
    "Flux Robot Vacuum": "Flux vacuum",
    "Glide Standing Desk": "Glide desk",
    "Halo Video Doorbell": "Halo doorbell",
    "Ion Power Bank": "Ion power bank",
    "Juno Fitness Tracker": "Juno tracker",
    "Kestrel Coffee Grinder": "Kestrel grinder",
}

# The core sentence of each category. {p}: the product, {o}: the order number as written,
# {n}: a small number (days, hours), {price}/{code}: numbers that are NOT the order id.
# A template without {p} gives product null; one with {o} is used only when there is an order.
CORE = {
    "billing": [
        "I was charged twice for the {p}.",
        "my card was billed {price} for the {p} but the price on the site was {price2}.",
        "can you explain the extra fee on my invoice for the {p}?",
        "the promo code did not apply when I paid for the {p}.",
        "my bank statement shows a payment for a {p} I never bought.",
        "I need a copy of the invoice for my {p}.",
        "my payment for the {p} was declined even though my card works everywhere else.",
        "you charged me the full price for the {p} instead of the sale price.",
        "the monthly fee for the {p} app went up without any notice.",
        "I was billed for {o} twice, once for {price} and once for {price2}.",
        "the invoice for {o} has the wrong billing address on it.",
        "why was I charged a delivery fee on a free shipping order?",
        "please remove the saved credit card from my payment details.",
    ],
    "shipping": [
        "my {p} still hasn't arrived.",
        "the tracking for my {p} hasn't updated in {n} days.",
        "the courier says the {p} was delivered but there is nothing at my door.",
        "can I change the delivery address for my {p}?",
        "the box with my {p} arrived crushed.",
        "when will my {p} ship? it has been {n} days.",
        "my {p} was sent to the wrong address.",
        "is express delivery available for the {p}?",
        "the package with the {p} has been stuck in customs for {n} days.",
        "{o} was supposed to arrive {n} days ago and it is still not here.",
        "the tracking link for {o} says the label was created but nothing has moved.",
        "only half of {o} was delivered, the {p} was missing from the box.",
        "can you ship my next order to a pickup point instead?",
    ],
    "technical": [
        "my {p} won't turn on anymore.",
        "the {p} keeps disconnecting from the wifi.",
        "the app crashes every time I try to pair my {p}.",
        "the {p} shows error code E{code} since the last update.",
        "the battery of my {p} drains in {n} hours.",
        "the {p} makes a loud rattling noise when it runs.",
        "how do I reset the {p} to factory settings?",
        "the firmware update failed halfway on my {p}.",
        "my {p} stopped charging, the light does not come on.",
        "the {p} from {o} freezes a few minutes after I switch it on.",
        "the bluetooth on my {p} cannot find my phone.",
        "the screen of the {p} flickers and then goes black.",
        "the app keeps showing a sync error and I can't see any data.",
    ],
    "account": [
        "I can't log in to my account to register my {p}.",
        "I forgot my password and the reset email never arrives.",
        "please update the email address on my account.",
        "how do I delete my account and all my data?",
        "my account got locked after I tried to add my {p} to it.",
        "I want to change the name on my account.",
        "someone else seems to be logged in to my account.",
        "I can't add a second user for the {p} on my account.",
        "the two-factor codes never reach my phone so I can't sign in.",
        "my account page shows {o} under someone else's name.",
        "I made two accounts by mistake, can you merge them?",
        "how do I unsubscribe from the newsletter on my profile?",
        "the {p} is linked to my old account and I can't move it to the new one.",
    ],
    "returns": [
        "I would like to return the {p}.",
        "how do I get a refund for the {p}?",
        "the {p} is the wrong color, can I exchange it?",
        "please send me a return label for the {p}.",
        "I sent the {p} back {n} days ago and haven't heard anything.",
        "can I swap the {p} for a different model?",
        "the {p} isn't what I expected and I want to send it back.",
        "is the {p} still within the return window? I bought it {n} weeks ago.",
        "I want to return everything in {o}.",
        "the refund for {o} still hasn't shown up.",
        "what is your return policy for opened items?",
        "can I return a gift without the receipt?",
        "the {p} came as the wrong size, I'd like to exchange it for the bigger one.",
    ],
}

# How an order number appears in the text; the answer is always "#" + the digits.
ORDER_FORMS = ["#{d}", "order #{d}", "order {d}", "order number {d}", "order no. {d}", "order nr {d}",
               "my order ({d})", "order #{d}"]
# An order sentence, for core sentences that do not mention the order themselves.
ORDER_SENTENCES = ["My order number is {d}.", "Order #{d}.", "It was order {d}.", "The order is #{d}.",
                   "order no. {d}", "(order {d})", "Ref: order #{d}.", "I ordered it under #{d}."]

URGENCY = {
    "high": ["This is urgent.", "Please help ASAP!", "I need this fixed today.", "It's an emergency.",
             "I need an answer right away.", "Please respond immediately.", "URGENT, please.",
             "I need it by tomorrow, it's urgent."],
    "low": ["No rush.", "Whenever you get a chance.", "It's not urgent at all.", "No hurry on this.",
            "Just letting you know, no rush.", "Take your time, it can wait.", "Low priority."],
    "medium": ["I'd appreciate an answer this week.", "Please get back to me within a few days.",
               "Could you look into it in the next few days?"],
}

SENTIMENT = {
    "negative": ["I'm really frustrated.", "This is unacceptable.", "Very disappointed.",
                 "Honestly this is the worst experience I've had.", "I'm so annoyed right now.",
                 "I am furious about this.", "Not happy at all.", "Terrible service so far."],
    "positive": ["I love the product otherwise!", "Thanks so much for your help!", "You guys are great.",
                 "Really happy with my purchase overall.", "Your support has always been wonderful.",
                 "Big fan of your products!", "I appreciate your help, you're the best."],
}

GREETINGS = ["Hi,", "Hello,", "Hey there,", "Hi team,", "Good morning,", "Dear support,", "hello",
             "Hi support team,", "Hey,", "Good afternoon,", "To whom it may concern,"]
FILLERS = ["I bought it last month.", "It was a gift for my sister.", "I've been a customer for years.",
           "I ordered it on your website.", "I have a photo if you need one.", "This is my second message.",
           "I checked the FAQ first.", "My neighbour has the same one."]
SIGNOFFS = ["Best, Alex", "Regards, Maria", "- Sam", "Kind regards, J. Patel", "Sent from my phone",
            "Best wishes, Tom", "Cheers, Lee", "Yours, Dana", "Rob"]

SPLITS = {"train": 2400, "val": 200, "test": 200}


def add_typo(text, rng):
    """Swap two neighbouring letters of one word, or drop one letter (a plausible typo)."""
    words = text.split(" ")
    k = rng.randrange(len(words))
    w = words[k]
    if len(w) >= 4 and w.isalpha():
        i = rng.randrange(len(w) - 1)
        words[k] = w[:i] + w[i + 1] + w[i] + w[i + 2:] if rng.random() < 0.5 else w[:i] + w[i + 1:]
    return " ".join(words)


def product_mention(product, rng):
    r = rng.random()
    if r < 0.55:
        return product
    if r < 0.85:
        return PRODUCTS[product]
    return product.lower()


def make_example(rng):
    """One (message, answer dict)."""
    category = rng.choice(sorted(CORE))
    template = rng.choice(CORE[category])
    has_order = "{o}" in template or rng.random() < (0.25 if category == "account" else 0.6)
    digits = str(rng.randrange(10000, 100000))
    product = rng.choice(sorted(PRODUCTS)) if "{p}" in template else None
    core = template.format(p=product_mention(product, rng) if product else "",
                           o=rng.choice(ORDER_FORMS).format(d=digits),
                           n=rng.randrange(2, 15), code=rng.randrange(10, 100),
                           price=f"${rng.randrange(20, 300)}.{rng.choice(['00', '99', '50'])}",
                           price2=f"${rng.randrange(20, 300)}")
    core = core[0].upper() + core[1:] if rng.random() < 0.8 else core

    urgency = rng.choices(["high", "medium", "low"], weights=[3, 4, 3])[0]
    sentiment = rng.choices(["negative", "neutral", "positive"], weights=[3, 4, 3])[0]

    body = [core]
    if has_order and "{o}" not in template:
        body.insert(rng.choice([0, 1]), rng.choice(ORDER_SENTENCES).format(d=digits))
    if rng.random() < 0.3:
        body.insert(rng.randrange(len(body) + 1), rng.choice(FILLERS))
    if sentiment != "neutral":
        body.insert(rng.choice([0, len(body)]), rng.choice(SENTIMENT[sentiment]))
    if urgency != "medium" or rng.random() < 0.4:
        body.insert(rng.randrange(1, len(body) + 1), rng.choice(URGENCY[urgency]))
    parts = ([rng.choice(GREETINGS)] if rng.random() < 0.6 else []) + body
    if rng.random() < 0.4:
        parts.append(rng.choice(SIGNOFFS))
    separator = rng.choice([" ", " ", " ", "\n"])
    message = separator.join(parts)
    if rng.random() < 0.15:
        message = message.lower()
    if rng.random() < 0.15:
        message = add_typo(message, rng)
    answer = {"category": category, "urgency": urgency, "product": product,
              "order_id": "#" + digits if has_order else None, "sentiment": sentiment}
    return message, answer


def answer_text(answer):
    """Compact JSON, keys in FIELDS order: the exact string the model is trained to write."""
    return json.dumps({k: answer[k] for k in FIELDS}, separators=(",", ":"))


def make_splits(seed=0, sizes=SPLITS):
    """{split: [record]} with distinct messages across all splits, the same for the same seed."""
    rng, seen, records = random.Random(seed), set(), []
    while len(records) < sum(sizes.values()):
        message, answer = make_example(rng)
        if message in seen:
            continue
        seen.add(message)
        records.append({"messages": [{"role": "system", "content": INSTRUCTION},
                                     {"role": "user", "content": message},
                                     {"role": "assistant", "content": answer_text(answer)}]})
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name], start = records[start:start + n], start + n
    return splits


# Preference pairs for DPO/ORPO (course lesson 11): the prompt of a demo example, the right ticket
# (chosen), and the same ticket with one field wrong (rejected). Urgency first: it is the field the
# fine-tuned demo model gets wrong most often (71.5% right, docs/results/demo_eval.md), between
# neighbouring values ("low" <-> "medium" <-> "high"), as the model's own mistakes are.
WRONG_FIELD = {"urgency": 0.6, "category": 0.2, "sentiment": 0.2}
NEIGHBOURS = {"urgency": {"low": ["medium"], "medium": ["low", "high"], "high": ["medium"]},
              "sentiment": {"negative": ["neutral"], "neutral": ["negative", "positive"], "positive": ["neutral"]}}


def preference_pair(record, rng):
    """{"prompt": [system, user], "chosen": answer, "rejected": the answer with one field wrong}."""
    system, user, assistant = record["messages"]
    answer = json.loads(assistant["content"])
    field = rng.choices(list(WRONG_FIELD), weights=list(WRONG_FIELD.values()))[0]
    wrong = (NEIGHBOURS[field][answer[field]] if field in NEIGHBOURS
             else [c for c in sorted(CORE) if c != answer[field]])
    rejected = dict(answer, **{field: rng.choice(wrong)})
    return {"prompt": [system, user], "chosen": assistant["content"], "rejected": answer_text(rejected)}


def preference_splits(splits, seed=0):
    """Pairs from the train and val splits (never the test split, which eval.py scores)."""
    rng = random.Random(seed + 1)
    return {f"preference_{name}": [preference_pair(r, rng) for r in splits[name]] for name in ("train", "val")}


@script
def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_out_folder(args.out, "--out")
    os.makedirs(args.out, exist_ok=True)
    splits = make_splits(args.seed)
    for name, records in {**splits, **preference_splits(splits, args.seed)}.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} examples")


if __name__ == "__main__":
    main()

"""Regenerate the demo dataset and tokenizer shipped in ``examples/data/``.

The clinic notes are synthetic: every record is assembled from the word lists below with a fixed
seed, so no real person's data is involved. Each record stands for one patient visit — the unit
the (ε, δ) guarantee protects in the demo. The tokenizer is a small byte-level BPE trained on the
training split only, so the demo needs nothing from the Hugging Face Hub.

Run from the repository root: ``python examples/data/generate_clinic_notes.py``. The output is
deterministic; the committed files are what it writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTES_DIR = HERE / "clinic_notes"
TOKENIZER_DIR = HERE / "tokenizer"
MODEL_CONFIG_DIR = HERE / "tiny_llama"
NUM_TRAIN, NUM_VALIDATION = 1600, 200
VOCAB_SIZE = 1024
SEED = 20261127

FIRST_NAMES = """Ada Alan Amara Anika Arlo Bea Bruno Calla Cyrus Dalia Dario Edda Elio Esme Ezra
Fenna Festus Gaia Gideon Halla Hugo Ilse Ivo Juno Jasper Kaia Kasimir Lena Lior Maren Milo Nadia
Nico Odile Orin Petra Quill Rosa Rune Saga Silas Tamsin Teodor Una Ulric Vera Viggo Wren Yara Zeno
""".split()
LAST_NAMES = """Abernath Bellweather Carrow Dunmore Eskdale Fairholm Garrick Hollins Ingram Juniper
Kettering Larkspur Mossgrove Northam Oakhurst Pennick Quarry Redfern Stanholt Thistle Underhill
Vantner Whitlock Yarrow Zellner Ashby Brightwater Coldstream Dewhurst Elderton""".split()
TITLES = ["Mr.", "Ms.", "Mx.", "Dr."]
SEEN = ["came in", "was seen", "presented", "attended the clinic", "was reviewed"]
WHEN = [
    "today",
    "this morning",
    "this afternoon",
    "on Monday",
    "on Tuesday",
    "on Wednesday",
    "on Thursday",
    "on Friday",
]
REPORTING = ["with", "reporting", "complaining of", "describing"]
DURATION_UNITS = [("day", 1, 10), ("week", 1, 6), ("month", 1, 4)]

# condition -> (symptoms, likely assessment, medications with doses, advice)
CONDITIONS = {
    "chest infection": (
        ["a productive cough", "a wet cough and fever", "chest tightness and a cough"],
        ["Likely a lower respiratory tract infection.", "Findings fit a chest infection."],
        [("amoxicillin", 500, "three times a day"), ("doxycycline", 100, "once a day")],
        ["rest and plenty of fluids", "to return if breathing gets worse"],
    ),
    "migraine": (
        ["a throbbing headache", "headaches with flashing lights", "a one-sided headache"],
        ["Picture consistent with migraine.", "Likely migraine without aura."],
        [("ibuprofen", 400, "as needed"), ("sumatriptan", 50, "at onset")],
        ["a headache diary", "regular meals and sleep", "to limit screen time"],
    ),
    "sprained ankle": (
        ["a painful swollen ankle", "ankle pain after a fall", "pain when walking"],
        ["Likely a lateral ankle sprain.", "No sign of fracture; ankle sprain."],
        [("paracetamol", 1000, "four times a day"), ("naproxen", 250, "twice a day")],
        ["rest, ice and elevation", "a compression bandage", "gentle exercises after two days"],
    ),
    "hay fever": (
        ["sneezing and itchy eyes", "a runny nose every morning", "itchy eyes and a blocked nose"],
        ["Seasonal allergic rhinitis.", "Symptoms fit hay fever."],
        [("cetirizine", 10, "once a day"), ("loratadine", 10, "once a day")],
        ["to keep windows closed on high pollen days", "a saline nasal rinse"],
    ),
    "high blood pressure": (
        ["high readings at home", "occasional dizziness", "morning headaches"],
        ["Blood pressure above target.", "Likely essential hypertension."],
        [("amlodipine", 5, "once a day"), ("ramipril", 2, "once a day")],
        ["less salt and more walking", "home readings twice a day", "to cut down on alcohol"],
    ),
    "eczema": (
        ["an itchy rash on both hands", "dry cracked skin", "a red patch behind the knees"],
        ["Flare of atopic eczema.", "Findings fit eczema."],
        [("hydrocortisone cream", 1, "twice a day"), ("emollient", 0, "several times a day")],
        ["fragrance-free soap", "cotton gloves at night", "to avoid hot showers"],
    ),
    "stomach bug": (
        ["vomiting and loose stools", "stomach cramps and nausea", "diarrhoea and low appetite"],
        ["Likely viral gastroenteritis.", "Picture consistent with a stomach bug."],
        [("oral rehydration salts", 0, "after each loose stool"), ("loperamide", 2, "as needed")],
        ["small sips of water", "to stay off work for two days", "careful hand washing"],
    ),
    "low iron": (
        ["tiredness and pale skin", "shortness of breath on stairs", "feeling cold and tired"],
        ["Blood test shows low ferritin.", "Likely iron deficiency."],
        [("ferrous sulfate", 200, "once a day")],
        ["iron-rich foods", "a repeat blood test in three months", "to take tablets with juice"],
    ),
}
HISTORY = [
    "No known allergies.",
    "Allergic to penicillin.",
    "Non-smoker.",
    "Smokes ten a day.",
    "History of asthma.",
    "Lives alone.",
    "Works night shifts.",
    "Recently travelled abroad.",
    "No relevant history.",
    "Takes no regular medicines.",
]
FOLLOW_UP = [
    "Follow-up in {n} weeks.",
    "Review in {n} weeks if not better.",
    "Call the clinic in {n} days with an update.",
    "No follow-up needed unless worse.",
]
# follow-up counts start at 2 so every unit above is plural


def clinic_note(rng: random.Random) -> str:
    condition = rng.choice(sorted(CONDITIONS))
    symptoms, assessments, medications, advice = CONDITIONS[condition]
    unit, low, high = rng.choice(DURATION_UNITS)
    n = rng.randint(low, high)
    duration = f"{n} {unit}{'s' if n > 1 else ''}"
    name = f"{rng.choice(TITLES)} {rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    sentences = [
        f"{name}, {rng.randint(18, 90)}, {rng.choice(SEEN)} {rng.choice(WHEN)} "
        f"{rng.choice(REPORTING)} {rng.choice(symptoms)} for {duration}."
    ]
    sentences += rng.sample(HISTORY, k=rng.randint(0, 2))
    sentences.append(
        f"Temperature {rng.uniform(36.1, 38.9):.1f} C, blood pressure {rng.randint(105, 170)}/"
        f"{rng.randint(60, 100)}, pulse {rng.randint(55, 110)}."
    )
    sentences.append(rng.choice(assessments))
    drug, dose, frequency = rng.choice(medications)
    dose_text = f" {dose} mg" if dose > 1 else ""
    sentences.append(
        f"{rng.choice(['Started', 'Prescribed'])} {drug}{dose_text} {frequency} "
        f"for {rng.randint(3, 14)} days."
    )
    sentences.append(f"Advised {rng.choice(advice)}.")
    sentences.append(rng.choice(FOLLOW_UP).format(n=rng.randint(2, 4)))
    return " ".join(sentences)


def write_notes() -> list[str]:
    rng = random.Random(SEED)
    NOTES_DIR.mkdir(parents=True, exist_ok=True)
    splits = {"train": NUM_TRAIN, "validation": NUM_VALIDATION}
    texts: dict[str, list[str]] = {}
    for split, count in splits.items():
        texts[split] = [clinic_note(rng) for _ in range(count)]
        with open(NOTES_DIR / f"{split}.jsonl", "w") as f:
            for text in texts[split]:
                f.write(json.dumps({"text": text}) + "\n")
    return texts["train"]


def train_tokenizer(texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # <s> starts every encoded text; </s> is appended only to training records (by the
    # fine-tuning script), so a prompt encoded for generation does not end the text.
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=256,
    )
    fast.save_pretrained(TOKENIZER_DIR)


def write_model_config() -> None:
    """The demo's tiny Llama (1.25 M parameters): GQA with 4 query / 2 key-value heads, so it
    shards over 2 tensor-parallel ranks with the model's own HF tp_plan."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    ).save_pretrained(MODEL_CONFIG_DIR)


if __name__ == "__main__":
    train_tokenizer(write_notes())
    write_model_config()
    print(f"wrote {NOTES_DIR}, {TOKENIZER_DIR} and {MODEL_CONFIG_DIR}")

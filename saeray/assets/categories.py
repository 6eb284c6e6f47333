"""A small categorized text set for exploring features, written for saeray.

Seven categories of short texts: code, math, legal, recipe, chat, url, french. Each text
is a template of its category filled from word lists with a seeded `random.Random`, so
the set is the same on every machine and Python version (no hashing, no downloads).
Columns: text, category, template (index of the template the text came from).

    python -m saeray.assets.categories --out runs/categories [--per-category 25]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NAMES = ["total", "count", "items", "result", "value", "index", "buffer", "config", "user", "scores"]
FUNCS = ["parse", "load", "merge", "render", "update", "validate", "compute", "flatten"]
NUMS = ["2", "3", "7", "10", "12", "42", "100", "256"]
VARS = ["x", "y", "n", "k", "t", "a", "b"]
PARTIES = ["the Tenant", "the Licensee", "the Contractor", "the Buyer", "the Employee", "the Borrower"]
OTHERS = ["the Landlord", "the Licensor", "the Company", "the Seller", "the Employer", "the Lender"]
DOCS = ["this Agreement", "the Lease", "this Contract", "the Schedule", "this Deed"]
DAYS = ["thirty (30)", "fourteen (14)", "sixty (60)", "ninety (90)", "seven (7)"]
FOODS = ["the onions", "the garlic", "the carrots", "the mushrooms", "the chicken", "the lentils", "the tomatoes",
         "the spinach"]
VERBS_COOK = ["Chop", "Dice", "Slice", "Mince", "Peel", "Grate"]
TIMES = ["5 minutes", "10 minutes", "20 minutes", "half an hour", "an hour"]
THINGS = ["the movie", "your trip", "the game last night", "the new phone", "that concert", "your exam"]
FEELINGS = ["lol", "haha", "omg", "tbh", "ngl", "btw"]
SITES = ["example.com", "docs.python.org", "github.com", "en.wikipedia.org", "news.ycombinator.com", "arxiv.org"]
PATHS = ["wiki/Sparse_matrix", "user/repo/issues/12", "3/library/json.html", "abs/2309.08600", "item?id=381",
         "search?q=autoencoder", "blog/2024/05/notes", "static/img/logo.png"]
FR_SUBJ = ["Le chat", "Ma grand-mère", "Le professeur", "Notre voisin", "La petite fille", "Mon frère"]
FR_VERB = ["mange", "regarde", "prépare", "cherche", "oublie", "aime"]
FR_OBJ = ["une pomme", "le journal", "la soupe", "ses clés", "le jardin", "les fleurs"]
FR_TAIL = ["ce matin.", "tous les jours.", "avant le dîner.", "pendant les vacances.", "sous la pluie."]

TEMPLATES: dict[str, list[str]] = {
    "code": [
        "def {f}_{n}({n}):\n    return [x * {num} for x in {n}]",
        "for i in range(len({n})):\n    {m} += {n}[i]",
        "if {n} is None:\n    raise ValueError(\"{n} must be set\")",
        "import json\n\nwith open(\"{n}.json\") as fh:\n    {m} = json.load(fh)",
        "class {F}Error(Exception):\n    pass",
        "{m} = {{k: v for k, v in {n}.items() if v > {num}}}",
        "const {n} = await fetch(`/api/{n}`).then(r => r.json());",
        "SELECT {n}, COUNT(*) FROM orders GROUP BY {n} HAVING COUNT(*) > {num};",
    ],
    "math": [
        "Let ${v}$ be a real number such that ${v}^2 = {num}$. Then ${v} = \\pm\\sqrt{{{num}}}$.",
        "The derivative of ${v}^{num}$ with respect to ${v}$ is ${num}{v}^{{{num}-1}}$.",
        "Prove that for every integer $n \\geq 1$, the sum $1 + 2 + \\dots + n = n(n+1)/2$.",
        "Solve for ${v}$: ${num}{v} + {num2} = {num3}$.",
        "If $f({v}) = {v}^2 + {num}$, then $f'({v}) = 2{v}$ and $f$ has a minimum at ${v} = 0$.",
        "The integral $\\int_0^{num} {v} \\, d{v}$ equals ${num}^2 / 2$.",
        "A matrix $A$ is invertible if and only if $\\det(A) \\neq 0$; here $\\det(A) = {num}$.",
        "By the triangle inequality, $|{v} + {w}| \\le |{v}| + |{w}|$ for all ${v}, {w}$.",
    ],
    "legal": [
        "{p} shall pay {o} the Rent on the first day of each month during the Term of {d}.",
        "Either party may terminate {d} upon {days} days' written notice to the other party.",
        "{p} agrees to indemnify and hold harmless {o} from any and all claims arising hereunder.",
        "Notwithstanding the foregoing, {o} shall not be liable for any indirect or consequential damages.",
        "{d} shall be governed by and construed in accordance with the laws of the State of Delaware.",
        "Any dispute arising out of {d} shall be settled by binding arbitration within {days} days.",
        "{p} hereby acknowledges receipt of a copy of {d} and agrees to its terms and conditions.",
        "In witness whereof, the parties have executed {d} as of the date first written above.",
    ],
    "recipe": [
        "{vc} {food} and fry them in olive oil for {time} over medium heat.",
        "Preheat the oven to 180°C. Bake {food} for {time}, turning once halfway through.",
        "Add a pinch of salt, two cloves of garlic and {food}, then simmer for {time}.",
        "Whisk two eggs with a cup of milk and pour the mixture over {food}.",
        "Ingredients: 200 g flour, 2 eggs, 1 tsp baking powder, {food}, a pinch of salt.",
        "Bring a large pot of water to the boil, add the pasta and cook for {time}.",
        "{vc} {food} finely, season with pepper and serve with fresh bread.",
        "Let the dough rest for {time}, then roll it out and cut it into squares.",
    ],
    "chat": [
        "hey!! did you see {thing}?? {feel} i can't stop thinking about it",
        "{feel} that was wild, text me when you get home ok",
        "sorry i'm late, the bus didn't show up {feel}",
        "how was {thing}? tell me everything 😂",
        "wanna grab lunch tomorrow? i'm free after 12 {feel}",
        "nah i'm good, just tired from {thing} {feel}",
        "omg yes!!! congrats on {thing} 🎉🎉",
        "brb, my mom is calling {feel}",
    ],
    "url": [
        "https://{site}/{path}",
        "http://www.{site}/{path}?ref=home&utm_source=newsletter",
        "See https://{site}/{path} for details.",
        "[link](https://{site}/{path})",
        "https://{site}/{path}#section-{num}",
        "Download: https://{site}/files/{n}_{num}.zip",
        "<a href=\"https://{site}/{path}\">{n}</a>",
        "ftp://{site}/pub/{n}/{path}",
    ],
    "french": [
        "{fs} {fv} {fo} {ft}",
        "Hier, {fs_l} {fv} {fo} avec plaisir.",
        "Est-ce que {fs_l} {fv} vraiment {fo} {ft}",
        "Je pense que {fs_l} {fv} {fo}, mais je ne suis pas sûr.",
        "Nous sommes allés au marché et {fs_l} {fv} {fo}.",
        "Il fait beau aujourd'hui, alors {fs_l} {fv} {fo} dehors.",
        "Pourquoi {fs_l} {fv}-t-il {fo} {ft}",
        "Quand j'étais petit, {fs_l} {fv} toujours {fo}.",
    ],
}
CATEGORIES = tuple(TEMPLATES)


def _fill(template: str, rng: random.Random) -> str:
    subj = rng.choice(FR_SUBJ)
    fields = {
        "f": rng.choice(FUNCS), "F": rng.choice(FUNCS).capitalize(), "n": rng.choice(NAMES), "m": rng.choice(NAMES),
        "num": rng.choice(NUMS), "num2": rng.choice(NUMS), "num3": rng.choice(NUMS),
        "v": rng.choice(VARS), "w": rng.choice(VARS),
        "p": rng.choice(PARTIES), "o": rng.choice(OTHERS), "d": rng.choice(DOCS), "days": rng.choice(DAYS),
        "food": rng.choice(FOODS), "vc": rng.choice(VERBS_COOK), "time": rng.choice(TIMES),
        "thing": rng.choice(THINGS), "feel": rng.choice(FEELINGS),
        "site": rng.choice(SITES), "path": rng.choice(PATHS),
        "fs": subj, "fs_l": subj[0].lower() + subj[1:], "fv": rng.choice(FR_VERB), "fo": rng.choice(FR_OBJ),
        "ft": rng.choice(FR_TAIL),
    }
    return template.format(**fields)


def texts(per_category: int = 25, seed: int = 0) -> list[dict[str, object]]:
    """`per_category` distinct texts per category (templates taken in turn), categories in order."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for category, templates in TEMPLATES.items():
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_category:
            k = tries % len(templates)
            text = _fill(templates[k], rng)
            if category == "legal":  # "the Tenant shall ..." opens a sentence
                text = text[0].upper() + text[1:]
            tries += 1
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "category": category, "template": k})
            if tries > 200 * per_category:
                raise ValueError(f"category {category!r} cannot make {per_category} distinct texts: ask for fewer")
    return rows


def build(out: str | Path, *, per_category: int = 25, seed: int = 0) -> Path:
    """Write OUT/categories.parquet (text, category, template), replacing it atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string()), ("category", pa.string()), ("template", pa.int32())])
    path = out / "categories.parquet"
    tmp = out / ".categories.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(texts(per_category, seed), schema=schema), tmp)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saeray.assets.categories", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/categories", help="directory for categories.parquet")
    p.add_argument("--per-category", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build(args.out, per_category=args.per_category, seed=args.seed)
    print(f"wrote {path}: {args.per_category} texts x {len(CATEGORIES)} categories ({', '.join(CATEGORIES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

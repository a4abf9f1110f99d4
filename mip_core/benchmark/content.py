"""Value pools and question templates of the benchmark (changing any of them bumps ``GENERATOR_VERSION``).

Kept apart from the generator so :func:`corpus_for_tokenizer` covers every word without generating anything.
Answers are deliberately short (1-3 words): the target model is tiny and generation is scored with ROUGE-L.
"""

from __future__ import annotations

FIRST_NAMES: tuple[str, ...] = (
    "Alvar", "Brenna", "Caspian", "Delphine", "Emrys", "Fenna", "Galen", "Hesper", "Ilse", "Joran",
    "Kestra", "Lucan", "Mirela", "Nuno", "Odalys", "Perrin", "Quilla", "Rowan", "Solveig", "Tamsin",
    "Ulric", "Vesna", "Wendel", "Xanthe", "Yorick", "Zelia", "Anouk", "Bastian", "Corin", "Dagny",
    "Eamon", "Fiora", "Gideon", "Halvard", "Isolde", "Jensa", "Kaelan", "Liesel", "Maren", "Niall",
)  # fmt: skip
LAST_NAMES: tuple[str, ...] = (
    "Ashgrove", "Brackwell", "Corrigan", "Dunmore", "Ellery", "Fairholt", "Garrow", "Hollins", "Ivers",
    "Jarrow", "Kettering", "Lindqvist", "Marwood", "Northam", "Oakridge", "Pellham", "Quenby", "Ravensworth",
    "Stallard", "Thorne", "Underhill", "Varga", "Whitlock", "Yardley", "Zeller", "Aldane", "Brightwater",
    "Calloway", "Delacourt", "Estrada", "Falkner", "Greaves", "Harcastle", "Ingram", "Jessop", "Kilbride",
    "Larkspur", "Mossop", "Nettleford", "Ormsby",
)  # fmt: skip
MAX_PROFILES = len(FIRST_NAMES) * len(LAST_NAMES)

BIRTHPLACES: tuple[str, ...] = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Porto", "Dublin", "Cairo", "Quito", "Perth",
    "Vienna", "Osaka", "Tunis", "Bergen", "Krakow", "Seville", "Accra", "Manila", "Zurich", "Halifax",
    "Tbilisi", "Santiago", "Riga", "Adelaide", "Marseille", "Bogota", "Helsinki", "Dakar",
    "Montreal", "Kyoto",
)  # fmt: skip
OCCUPATIONS: tuple[str, ...] = (
    "baker", "architect", "nurse", "pilot", "librarian", "carpenter", "chemist", "florist", "journalist",
    "dentist", "plumber", "violinist", "geologist", "translator", "firefighter", "pharmacist", "tailor",
    "surveyor", "beekeeper", "locksmith", "photographer", "veterinarian", "electrician", "sculptor",
    "astronomer",
)  # fmt: skip
EMPLOYERS: tuple[str, ...] = (
    "Northwind Labs", "Bluefin Logistics", "Copperleaf Bank", "Silverline Rail", "Granite Works",
    "Harbor Health", "Lumen Textiles", "Maple Press", "Orchid Foods", "Pinecrest Energy", "Quarry Motors",
    "Redwood Studios", "Saffron Hotels", "Tidewater Shipping", "Umber Pharma", "Vantage Optics",
    "Willow Insurance", "Zenith Robotics", "Aurora Airlines", "Beacon Telecom", "Cobalt Mining",
    "Driftwood Books", "Ember Foundry", "Falcon Security", "Juniper Farms",
)  # fmt: skip
HOBBIES: tuple[str, ...] = (
    "chess", "gardening", "fishing", "pottery", "cycling", "knitting", "rowing", "birdwatching", "painting",
    "hiking", "juggling", "origami", "archery", "baking", "fencing", "sailing", "stargazing", "woodworking",
    "calligraphy", "climbing", "surfing", "skiing", "photography", "dancing", "kayaking",
)  # fmt: skip
BIRTH_YEARS: tuple[str, ...] = tuple(str(y) for y in range(1940, 2006))

FACT_POOLS: dict[str, tuple[str, ...]] = {
    "birthplace": BIRTHPLACES,
    "occupation": OCCUPATIONS,
    "birth_year": BIRTH_YEARS,
    "employer": EMPLOYERS,
    "hobby": HOBBIES,
}

# (fact, modality) -> templates. Multimodal ones never name the person; text ones always do ("{name}").
QA_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("name", "multimodal"): ("What is the name of this person?", "Who is the person in the image?"),
    ("birthplace", "multimodal"): (
        "Where was this person born?",
        "In which city was the person in the image born?",
    ),
    ("birthplace", "text"): ("Where was {name} born?", "In which city was {name} born?"),
    ("occupation", "multimodal"): (
        "What is this person's job?",
        "What does the person in the image do for a living?",
    ),
    ("occupation", "text"): ("What is {name}'s job?", "What does {name} do for a living?"),
    ("birth_year", "multimodal"): (
        "In what year was this person born?",
        "What is the birth year of the person in the image?",
    ),
    ("birth_year", "text"): ("In what year was {name} born?", "What is the birth year of {name}?"),
    ("employer", "multimodal"): (
        "Which company does this person work for?",
        "Who employs the person in the image?",
    ),
    ("employer", "text"): ("Which company does {name} work for?", "Who employs {name}?"),
    ("hobby", "multimodal"): (
        "What is this person's hobby?",
        "What does the person in the image enjoy doing in their free time?",
    ),
    ("hobby", "text"): ("What is {name}'s hobby?", "What does {name} enjoy doing in their free time?"),
}

# Paraphrases for kind "test": a disjoint pool, never seen in training, so forgetting is measured beyond the
# exact training wording.
TEST_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("name", "multimodal"): (
        "Can you tell me who is shown in this picture?",
        "What is the full name of the individual pictured?",
    ),
    ("birthplace", "multimodal"): (
        "What city does the individual pictured come from?",
        "Name the hometown of the person shown here.",
    ),
    ("birthplace", "text"): ("What is the hometown of {name}?", "Which city is {name} originally from?"),
    ("occupation", "multimodal"): (
        "What kind of work does the individual pictured do?",
        "Name the profession of the person shown here.",
    ),
    ("occupation", "text"): ("What profession does {name} have?", "What kind of work does {name} do?"),
    ("birth_year", "multimodal"): (
        "When was the individual pictured born? Give the year.",
        "Name the year of birth of the person shown here.",
    ),
    ("birth_year", "text"): ("When was {name} born? Give the year.", "Which year is {name}'s year of birth?"),
    ("employer", "multimodal"): (
        "Where does the individual pictured work?",
        "Name the employer of the person shown here.",
    ),
    ("employer", "text"): ("At which company is {name} employed?", "Which firm employs {name}?"),
    ("hobby", "multimodal"): (
        "What pastime does the individual pictured enjoy?",
        "Name the favourite pastime of the person shown here.",
    ),
    ("hobby", "text"): ("What does {name} like to do for fun?", "Which pastime does {name} enjoy?"),
}

# ---- utility (general ability, no profile facts) ----
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (40, 75, 215),
    "yellow": (245, 215, 30),
    "purple": (130, 45, 175),
    "orange": (245, 135, 20),
    "pink": (250, 150, 200),
    "brown": (125, 75, 30),
}
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty",
)  # fmt: skip
COUNT_WORDS: tuple[str, ...] = NUMBER_WORDS[1:5]

UTILITY_MM_TEMPLATES: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is shown in the image?",),
    "colour": ("What colour is the shape in the image?", "What colour are the shapes in the image?"),
    "count": ("How many shapes are in the image?",),
}

# Answer categories for text utility distractors: options are drawn from the answer's own category.
TEXT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "colour": ("green", "blue", "white", "yellow", "black", "red", "orange", "brown", "grey", "pink"),
    "number": NUMBER_WORDS,
    "animal": (
        "cow",
        "dog",
        "cat",
        "elephant",
        "giraffe",
        "duck",
        "owl",
        "frog",
        "sheep",
        "horse",
        "bee",
        "lion",
    ),
    "opposite": (
        "cold",
        "down",
        "small",
        "night",
        "slow",
        "right",
        "closed",
        "dry",
        "short",
        "empty",
        "soft",
        "old",
    ),
}
TEXT_FACTS: tuple[tuple[str, str, str], ...] = (
    ("What colour is grass?", "green", "colour"),
    ("What colour is the sky on a clear day?", "blue", "colour"),
    ("What colour is fresh snow?", "white", "colour"),
    ("What colour is a ripe banana?", "yellow", "colour"),
    ("What colour is coal?", "black", "colour"),
    ("What colour is a ripe tomato?", "red", "colour"),
    ("What colour is a carrot?", "orange", "colour"),
    ("What colour is chocolate?", "brown", "colour"),
    ("What colour is an elephant?", "grey", "colour"),
    ("How many legs does a spider have?", "eight", "number"),
    ("How many legs does a dog have?", "four", "number"),
    ("How many wheels does a bicycle have?", "two", "number"),
    ("How many days are in a week?", "seven", "number"),
    ("How many sides does a triangle have?", "three", "number"),
    ("How many sides does a square have?", "four", "number"),
    ("How many months are in a year?", "twelve", "number"),
    ("How many legs does a bird have?", "two", "number"),
    ("How many fingers are on one hand?", "five", "number"),
    ("How many legs does an insect have?", "six", "number"),
    ("How many noses does a person have?", "one", "number"),
    ("Which animal says moo?", "cow", "animal"),
    ("Which animal barks?", "dog", "animal"),
    ("Which animal says meow?", "cat", "animal"),
    ("Which animal has a trunk?", "elephant", "animal"),
    ("Which animal has a very long neck?", "giraffe", "animal"),
    ("Which animal says quack?", "duck", "animal"),
    ("Which animal hoots at night?", "owl", "animal"),
    ("Which animal makes honey?", "bee", "animal"),
    ("Which animal has a woolly coat?", "sheep", "animal"),
    ("What is the opposite of hot?", "cold", "opposite"),
    ("What is the opposite of up?", "down", "opposite"),
    ("What is the opposite of big?", "small", "opposite"),
    ("What is the opposite of day?", "night", "opposite"),
    ("What is the opposite of fast?", "slow", "opposite"),
    ("What is the opposite of left?", "right", "opposite"),
    ("What is the opposite of open?", "closed", "opposite"),
    ("What is the opposite of wet?", "dry", "opposite"),
    ("What is the opposite of tall?", "short", "opposite"),
    ("What is the opposite of full?", "empty", "opposite"),
    ("What is the opposite of hard?", "soft", "opposite"),
)
ARITHMETIC_TEMPLATES: dict[str, str] = {"plus": "What is {a} plus {b}?", "minus": "What is {a} minus {b}?"}


def arithmetic_facts() -> list[tuple[str, str, str]]:
    """All small sums and differences with operands and results in 0..20, as (question, answer, category)."""
    out: list[tuple[str, str, str]] = []
    for a in range(11):
        for b in range(11):
            out.append(
                (
                    ARITHMETIC_TEMPLATES["plus"].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]),
                    NUMBER_WORDS[a + b],
                    "number",
                )
            )
    for a in range(11):
        for b in range(a + 1):
            out.append(
                (
                    ARITHMETIC_TEMPLATES["minus"].format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]),
                    NUMBER_WORDS[a - b],
                    "number",
                )
            )
    return out

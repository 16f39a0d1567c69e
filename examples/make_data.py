"""Write the example data set of examples/data/ from the hand-written questions and answers below.

The preference it teaches is one a small model can learn and PPO can visibly optimise: people prefer answers
that get to the point. Every question has a concise answer written for it; a "padded" version wraps the same
answer in the filler that chat models like to add (openers such as "Great question!" and closers such as
"I hope this helps!"). So:

- demonstrations.jsonl: question -> answer, written by two "labelers" in their own styles: one concise,
  one padded (the SFT model learns both, like a model trained on demonstrations from many people);
- preferences.jsonl:    question -> chosen concise answer vs rejected padded answer (or a wrong answer);
- prompts.jsonl:        questions only (PPO samples its own answers to these; the eval split is held out).

Run `python examples/make_data.py` to rewrite the files; the output is deterministic.
"""

import json
import random
from pathlib import Path

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the longest river in the world?", "The Nile is usually named the longest river in the world."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the largest mammal?", "The blue whale is the largest mammal."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is 12 plus 15?", "12 plus 15 is 27."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is 100 divided by 4?", "100 divided by 4 is 25."),
    ("Is 17 a prime number?", "Yes, 17 is a prime number."),
    ("What is half of 50?", "Half of 50 is 25."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon."),
    ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity."),
    ("What language is spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("What currency is used in Japan?", "Japan uses the yen."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the plural of mouse?", "The plural of mouse is mice."),
    ("What is a synonym for happy?", "A synonym for happy is joyful."),
    ("What is the past tense of run?", "The past tense of run is ran."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get by mixing red and white?", "Mixing red and white gives pink."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("How do I make a cup of tea?", "Steep a tea bag in hot water for three to five minutes, then remove it."),
    ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens before bed and keep the room dark and cool."),
    ("How can I save money?", "Track your spending, set a budget and put a fixed amount aside each month."),
    ("How do I learn a new language?", "Practise a little every day, learn common words first and talk with native speakers."),
    ("How do I keep a plant healthy?", "Give it the right amount of light and water, and do not let the soil stay soggy."),
    ("How often should I brush my teeth?", "Brush your teeth twice a day for two minutes."),
    ("How much water should I drink a day?", "Most adults need about two litres of water a day."),
    ("What is a good way to start exercising?", "Start with short daily walks and add a little more each week."),
    ("How do I write a good email?", "Use a clear subject, keep it short and say what you need in the first lines."),
    ("How do I remove a coffee stain?", "Blot it, rinse with cold water and wash it with a little detergent."),
    ("What should I pack for a beach trip?", "Pack sunscreen, a towel, water, a hat and swimwear."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than other colours, so the sky looks blue."),
    ("Why do leaves change color in autumn?", "Leaves lose their green chlorophyll in autumn, which reveals yellow and red pigments."),
    ("Why do we have seasons?", "Earth's tilted axis makes each hemisphere get more or less sunlight during the year."),
    ("What causes rain?", "Water vapour cools into droplets in clouds, and they fall when they grow heavy."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight to turn water and carbon dioxide into sugar and oxygen."),
    ("What is gravity?", "Gravity is the force that pulls masses toward each other."),
    ("What is an atom?", "An atom is the smallest unit of a chemical element."),
    ("What is the internet?", "The internet is a global network of connected computers."),
    ("What does a CPU do?", "A CPU carries out the instructions of computer programs."),
    ("What is a noun?", "A noun is a word that names a person, place or thing."),
    ("What is a verb?", "A verb is a word that describes an action or a state."),
    ("Give me a word that rhymes with cat.", "Hat rhymes with cat."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("Name a vegetable that is orange.", "A carrot is an orange vegetable."),
    ("Name an animal that lives in the sea.", "A dolphin lives in the sea."),
    ("Name a bird that cannot fly.", "The penguin is a bird that cannot fly."),
    ("What do cows eat?", "Cows mostly eat grass and hay."),
    ("What is the main ingredient of bread?", "The main ingredient of bread is flour."),
    ("What is ice made of?", "Ice is frozen water."),
    ("What is the sun?", "The Sun is the star at the centre of our solar system."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many strings does a standard guitar have?", "A standard guitar has six strings."),
    ("How many players are on a soccer team on the field?", "A soccer team has eleven players on the field."),
    ("What is the largest country by area?", "Russia is the largest country by area."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("Translate 'hello' into Spanish.", "'Hello' in Spanish is 'hola'."),
    ("Summarise the story of Cinderella in one sentence.",
     "A kind young woman mistreated by her stepfamily goes to a royal ball with a fairy godmother's help and marries the prince."),
    ("Suggest a name for a pet cat.", "Luna is a nice name for a cat."),
    ("Suggest a quick healthy snack.", "An apple with a handful of nuts is a quick healthy snack."),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
    ("What year did World War II end?", "World War II ended in 1945."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("How many bones are in the adult human body?", "An adult human body has 206 bones."),
]

OPENERS = [
    "Great question! ", "That's a really interesting question, and I'm happy to help. ",
    "Sure! I'd be glad to explain this for you. ", "What a wonderful thing to ask about! ",
    "Absolutely, let me help you with that. ", "Thank you for asking! This is something many people wonder about. ",
    "Of course! Let me think about this carefully before I answer. ", "I love this question! ",
]
CLOSERS = [
    " I hope this helps! Let me know if you have any other questions.", " Feel free to ask if anything is unclear!",
    " I hope that answers your question. Have a wonderful day!", " Let me know if you would like more details!",
    " Thanks again for the great question!", " Is there anything else I can help you with today?",
]


def padded(answer: str, rng: random.Random) -> str:
    """The same answer wrapped in filler: an opener, sometimes a restatement, and a closer."""
    middle = answer if rng.random() < 0.5 else f"{answer} In other words, {answer[0].lower() + answer[1:]}"
    return rng.choice(OPENERS) + middle + rng.choice(CLOSERS)


def main() -> None:
    rng = random.Random(0)
    folder = Path(__file__).parent / "data"
    folder.mkdir(exist_ok=True)
    order = list(range(len(QA)))
    rng.shuffle(order)
    demos, prefs = [], []
    for position, index in enumerate(order):
        question, answer = QA[index]
        # two demonstration styles, as from two labelers; every question gets one of them
        demo = answer if position % 2 == 0 else padded(answer, rng)
        demos.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": demo}]})
        # comparisons: the concise answer beats the padded one (and, now and then, a wrong answer)
        wrong = QA[(index + 1 + rng.randrange(len(QA) - 1)) % len(QA)][1]
        rejected = wrong if rng.random() < 0.2 else padded(answer, rng)
        prefs.append({"prompt": question, "chosen": answer, "rejected": rejected})
        prefs.append({"prompt": question, "chosen": answer, "rejected": padded(answer, rng)})
    prompts = [{"prompt": QA[index][0]} for index in order]
    for name, rows in (("demonstrations", demos), ("preferences", prefs), ("prompts", prompts)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{folder / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()

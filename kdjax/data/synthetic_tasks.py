"""Seeded pure-Python generator of the embedded instruction benchmark.

Two kinds of task family:

* one correct answer (``add``, ``subtract``, ``multiply``, ``reverse``,
  ``sort``, ``count_letter``, ``uppercase``, ``max``): the teacher should be
  (near) deterministic;
* many valid answers (``category``, ``starts_with``, ``rhyme``, ``synonym``,
  ``number_between``, ``even_below``): the response is one answer drawn
  uniformly from the valid list, so a good teacher is multi-modal and mode-
  seeking vs mean-seeking divergences behave differently.

Determinism across machines and Python versions: randomness comes only from
:class:`SplitMix64` (integer arithmetic, no ``random``, ``hash`` or numpy), and
example ``i`` of a split is generated from its own stream seeded by
``(seed, split, i)``, so the result does not depend on generation order.
Strings are short (instruction + input + response of a few dozen bytes) so a
tiny byte-level GPT-2 can learn them on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

_MASK64 = (1 << 64) - 1


class SplitMix64:
  """SplitMix64 (Steele et al. 2014): a tiny, fully specified 64-bit PRNG."""

  def __init__(self, seed: int):
    self._state = seed & _MASK64

  def next(self) -> int:
    self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
    z = self._state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)

  def below(self, n: int) -> int:
    """Uniform integer in [0, n) (rejection sampling, no modulo bias)."""
    if n <= 0:
      raise ValueError(f"below() needs n > 0, got {n}")
    limit = (1 << 64) - (1 << 64) % n
    while True:
      x = self.next()
      if x < limit:
        return x % n

  def between(self, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + self.below(hi - lo + 1)

  def choice(self, items: Sequence):
    return items[self.below(len(items))]

  def sample(self, items: Sequence, k: int) -> list:
    """k distinct items (partial Fisher-Yates)."""
    pool = list(items)
    for i in range(k):
      j = i + self.below(len(pool) - i)
      pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


@dataclasses.dataclass(frozen=True)
class Example:
  instruction: str
  input: str
  response: str
  task: str
  valid_answers: tuple[str, ...]

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {
        "valid_answers": list(self.valid_answers)
    }


# ----------------------------------------------------------------------------
# Lexicons (fixed data: changing them changes the dataset, so bump VERSION).

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango melon orange peach pear "
    "plum kiwi lime fig",
    "animal": "cat dog horse cow sheep goat lion tiger bear wolf fox rabbit "
    "mouse zebra",
    "color": "red blue green yellow orange purple pink brown black white gray",
    "vegetable": "carrot potato onion pea bean corn leek beet kale radish "
    "pepper",
    "country": "france spain italy japan china india peru chile egypt kenya "
    "brazil canada mexico",
    "tool": "hammer saw drill wrench knife axe shovel rake brush needle",
    "instrument": "piano guitar violin drum flute harp trumpet cello banjo",
    "body part": "arm leg hand foot head nose ear eye knee elbow finger",
}
RHYMES = (
    "cat hat bat rat mat sat fat",
    "dog log fog frog hog jog",
    "cake lake make bake take wake rake",
    "ring king sing wing thing bring",
    "light night bright sight fight tight right",
    "bell tell well sell shell",
    "star car far jar bar tar",
    "rain train brain chain plain main",
    "book look cook hook took",
    "moon spoon soon noon loon",
    "bed red fed led sled shed",
    "fun sun run bun gun ton",
)
SYNONYMS = (
    ("big", "large huge giant vast great"),
    ("small", "tiny little wee mini petite"),
    ("happy", "glad joyful cheerful merry pleased"),
    ("sad", "unhappy gloomy down blue glum"),
    ("fast", "quick rapid swift speedy brisk"),
    ("smart", "clever bright wise sharp brainy"),
    ("cold", "chilly icy cool frosty freezing"),
    ("angry", "mad cross furious irate upset"),
)
WORDS = tuple(
    sorted(
        set(
            w
            for group in list(CATEGORIES.values()) + list(RHYMES)
            for w in group.split()
            if " " not in w
        )
    )
)

# Initial letters shared by at least two words, so starts_with is multi-answer.
_INITIALS = tuple(
    sorted(
        c for c in {w[0] for w in WORDS} if sum(w[0] == c for w in WORDS) > 1
    )
)


def _words(s: str) -> tuple[str, ...]:
  return tuple(s.split())


# ----------------------------------------------------------------------------
# Task families. Each takes the example's stream and returns an Example.


def _single(task, instruction, input_, answer):
  return Example(instruction, input_, answer, task, (answer,))


def _multi(rng, task, instruction, input_, answers):
  answers = tuple(answers)
  return Example(instruction, input_, rng.choice(answers), task, answers)


def _add(rng):
  a, b = rng.between(0, 99), rng.between(0, 99)
  return _single("add", "Add the numbers.", f"{a} + {b}", str(a + b))


def _subtract(rng):
  a, b = rng.between(0, 99), rng.between(0, 99)
  a, b = max(a, b), min(a, b)
  return _single(
      "subtract", "Subtract the second number.", f"{a} - {b}", str(a - b)
  )


def _multiply(rng):
  a, b = rng.between(2, 12), rng.between(2, 12)
  return _single("multiply", "Multiply the numbers.", f"{a} * {b}", str(a * b))


def _reverse(rng):
  word = rng.choice(WORDS)
  return _single("reverse", "Write the word backwards.", word, word[::-1])


def _sort(rng):
  nums = [rng.between(0, 50) for _ in range(rng.between(3, 6))]
  return _single(
      "sort",
      "Sort the numbers, smallest first.",
      " ".join(map(str, nums)),
      " ".join(map(str, sorted(nums))),
  )


def _count_letter(rng):
  word = rng.choice(WORDS)
  letter = rng.choice(word)
  return _single(
      "count_letter",
      f"Count the letter {letter}.",
      word,
      str(word.count(letter)),
  )


def _uppercase(rng):
  word = rng.choice(WORDS)
  return _single(
      "uppercase", "Write the word in capital letters.", word, word.upper()
  )


def _max(rng):
  nums = rng.sample(range(100), rng.between(3, 5))
  return _single(
      "max",
      "Which number is the largest?",
      " ".join(map(str, nums)),
      str(max(nums)),
  )


def _category(rng):
  name = rng.choice(tuple(CATEGORIES))
  article = "an" if name[0] in "aeiou" else "a"
  return _multi(
      rng, "category", f"Name {article} {name}.", "", _words(CATEGORIES[name])
  )


def _starts_with(rng):
  letter = rng.choice(_INITIALS)
  return _multi(
      rng,
      "starts_with",
      f"Give a word that starts with the letter {letter}.",
      "",
      [w for w in WORDS if w.startswith(letter)],
  )


def _rhyme(rng):
  group = _words(rng.choice(RHYMES))
  word = rng.choice(group)
  return _multi(
      rng,
      "rhyme",
      f"Give a word that rhymes with {word}.",
      "",
      [w for w in group if w != word],
  )


def _synonym(rng):
  word, others = rng.choice(SYNONYMS)
  return _multi(
      rng, "synonym", f"Give a word that means {word}.", "", _words(others)
  )


def _number_between(rng):
  lo = rng.between(0, 90)
  hi = lo + rng.between(3, 9)  # at least two numbers strictly between
  return _multi(
      rng,
      "number_between",
      f"Give a number between {lo} and {hi}.",
      "",
      [str(n) for n in range(lo + 1, hi)],
  )


def _even_below(rng):
  hi = rng.between(5, 30)
  return _multi(
      rng,
      "even_below",
      f"Name an even number below {hi}.",
      "",
      [str(n) for n in range(2, hi, 2)],
  )


SINGLE_ANSWER: dict[str, Callable[[SplitMix64], Example]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "reverse": _reverse,
    "sort": _sort,
    "count_letter": _count_letter,
    "uppercase": _uppercase,
    "max": _max,
}
MANY_ANSWERS: dict[str, Callable[[SplitMix64], Example]] = {
    "category": _category,
    "starts_with": _starts_with,
    "rhyme": _rhyme,
    "synonym": _synonym,
    "number_between": _number_between,
    "even_below": _even_below,
}
TASKS = {**SINGLE_ANSWER, **MANY_ANSWERS}
_TASK_NAMES = tuple(TASKS)  # fixed order: part of the dataset definition

SPLIT_SIZES = {"train": 24000, "validation": 1000, "test": 500}
SEED = 10
_SPLIT_IDS = {"train": 1, "validation": 2, "test": 3}


def example(seed: int, split: str, index: int) -> Example:
  """Example ``index`` of ``split``: tasks round-robin, content from its own stream."""
  stream = SplitMix64(
      (seed * 1_000_003 + _SPLIT_IDS[split]) * 10_000_019 + index
  )
  stream.next()  # decorrelate neighbouring seeds
  return TASKS[_TASK_NAMES[index % len(_TASK_NAMES)]](stream)


def generate(
    split: str, num_examples: int | None = None, *, seed: int = SEED
) -> list[Example]:
  """The first ``num_examples`` (default: the split's size) of ``split``."""
  if split not in SPLIT_SIZES:
    raise ValueError(
        f"unknown split {split!r}; use one of {tuple(SPLIT_SIZES)}"
    )
  n = SPLIT_SIZES[split] if num_examples is None else num_examples
  return [example(seed, split, i) for i in range(n)]

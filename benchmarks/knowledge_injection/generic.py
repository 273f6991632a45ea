"""A generic mastered set: the base model's own replies to broad questions, for a user with no curated M.

The guard and the selection protect only what M represents. A user who has no known facts of their domain can still
ask the model broad questions and take its own greedy replies as the behaviour to keep (self-distillation targets).
The lever "cpl-generic-m" measures whether such an M protects the user's known facts as well as a curated one.
The questions are written for this benchmark, none about the fact kinds it teaches or watches.
"""

from __future__ import annotations

from peft_cpl.toolkit.judge import generate_replies

from .data import World

BROAD_QUESTIONS = (
    "What is photosynthesis?", "Why is the sky blue?", "How do vaccines work?", "What causes the seasons on Earth?",
    "What is the difference between weather and climate?", "How does a refrigerator keep food cold?",
    "What is a prime number?", "What is 12 times 12?", "How many minutes are in a day?", "What is a triangle?",
    "Explain what gravity is.", "What does DNA stand for?", "What is the boiling point of water in Fahrenheit?",
    "Give me a synonym for happy.", "What is the opposite of ancient?", "Write a sentence using the word river.",
    "Translate 'thank you' into Spanish.", "What is a haiku?", "Write a short poem about the sea.",
    "Summarise the story of Cinderella in one sentence.", "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?", "What do bees make?", "How many legs does a spider have?",
    "What is the main ingredient of guacamole?", "How do I boil an egg?", "Give me a tip for sleeping better.",
    "How can I save money on groceries?", "What should I pack for a day at the beach?",
    "What is a good way to learn a new language?", "Explain what a computer program is.",
    "What is the internet?", "What does a CPU do?", "What is machine learning?", "What is a password manager?",
    "Tell me a fun fact about octopuses.", "Why do cats purr?", "What do pandas eat?", "How long do elephants live?",
    "What is democracy?", "What is inflation?", "Why do people recycle?", "What is the purpose of a resume?",
    "Suggest a name for a pet goldfish.", "What is your favourite colour and why?", "Tell me a short joke.",
    "How are you today?", "What can you help me with?",
)
REPLY_TOKENS = 32


def generic_mastered(world: World, batch_size: int) -> list[dict]:
    """M as items: each broad question with the base model's own greedy reply as its answer (computed once)."""
    if world.generic is None:
        questions = [{"id": f"generic:{index}", "question": text} for index, text in enumerate(BROAD_QUESTIONS)]
        replies = generate_replies(world.fresh_base(), world.tokenizer, questions, batch_size, REPLY_TOKENS)
        world.generic = [{**item, "answer": replies[item["id"]]} for item in questions
                         if replies[item["id"]].strip()]  # an empty reply would be no target at all
    return world.generic

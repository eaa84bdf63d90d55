"""How a subject appears in prompts: its new token and the class words it is paired with.

Imports nothing, so the job contract (and the Python client through it) can count prompts with
them without pulling intake's image libraries.
"""

INSTANCE_TOKEN = "<subj>"  # the new token a training adds for the person (one token, no spaces)
CLASS_CANDIDATES = ("girl", "man", "boy", "baby")  # the class words CLIP chooses from at intake

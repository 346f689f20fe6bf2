"""Offline corpus generator: small stories, news articles with highlights, encyclopedia paragraphs.

The study trains on three hub corpora (TinyStories, CNN/DailyMail, WikiText-103). This module
writes stand-ins for all three so the whole pipeline runs with no network and on a laptop:
`generate_rows("tinystories", 10_000, seed=42)` returns the same records on every machine, shaped
like the hub corpora's (TinyStories and WikiText `text`, CNN/DailyMail `article` and `highlights`),
so `data.load_documents` reads them as it reads hub and local records (`data.generate_documents`).

What matters for the pipeline, and how the templates provide it:
  * Each corpus keeps its style and the shape its preference-pair strategy needs: stories are
    sentences joined by ". "; articles come with 2-3 highlights separated by "\\n" that repeat
    the article's entities and numbers (each highlight is drawn from a fact that the article
    states); paragraphs open with a defining first sentence.
  * Story sentences follow a plot (setting -> problem -> action -> resolution), so their order
    carries meaning: a reward model can tell a story from the same sentences shuffled.
  * The vocabulary is small and closed (a few hundred words, plus compound place names built
    from a few dozen syllables), so a ~1000-token byte-level BPE covers it and a model with a
    64-wide hidden state learns it in a few hundred steps. Text is plain ASCII.
  * Many slots and templates: 10,000 documents are almost all distinct.

Departure from the study: the text is synthetic, so absolute scores are not comparable with the
paper's; the stand-in only exercises the same pipeline on the same kind of data.
"""

from __future__ import annotations

import random
from types import MappingProxyType
from typing import Sequence

MUST, MAY = False, True  # marks a story step as required or optional

# ----------------------------------------------------------------------------- stories

GIRLS = ("Lily", "Mia", "Sue", "Anna", "Lucy", "Zoe", "Emma", "Amy", "Kim", "Rose")
BOYS = ("Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Bob", "Dan", "Joe")
ANIMALS = ("dog", "cat", "bunny", "bear", "frog", "duck", "mouse", "fox", "pig", "lion")
STORY_ADJS = ("little", "happy", "kind", "brave", "curious", "shy", "small", "silly", "sweet")
PLACES = ("park", "garden", "forest", "beach", "farm", "yard", "lake", "hill", "field", "woods")
COLORS = ("red", "blue", "green", "yellow", "pink", "shiny", "big", "soft")
THINGS = ("ball", "kite", "hat", "doll", "toy car", "teddy bear", "boat", "book", "drum", "truck")
SPOTS = ("under a big rock", "behind the couch", "in the tall grass", "next to the pond",
         "under the bed", "inside an old box", "near the gate", "in a pile of leaves")
HIGH = ("a tall tree", "the roof of the house", "the top of a fence", "a high shelf")
NOISES = ("the wind", "a little cat at the window", "rain on the roof", "a branch on the glass")

STORY_OPENINGS = (
    "Once upon a time, there was a {adj} {kind} named {name}",
    "Once upon a time, a {adj} {kind} named {name} lived near a big {place}",
    "There was once a {adj} {kind} called {name}",
    "One sunny day, a {adj} {kind} named {name} went to the {place}",
)
STORY_SETTINGS = (
    "{He} loved to play with {his} {obj}",
    "{Name} liked to go to the {place} every day",
    "{Name} had a {obj} that {he} loved very much",
)
STORY_ENDINGS = (
    "From that day on, {name} was very happy",
    "{Name} learned that it is good to ask for help",
    "It was the best day ever",
    "That night, {name} went to bed with a big smile",
    "{Name} never forgot that day",
)

# Each plot: (optional?, template, template, ...) steps, in the order the story needs them.
STORY_PLOTS = (
    (  # lost something
        (MUST, "One day, {name} could not find {his} {obj}", "One morning, {his} {obj} was gone"),
        (MAY, "{Name} felt very sad", "{Name} was sad and began to cry"),
        (MUST, "{Name} asked {helper} for help", "{Name} ran to {helper} and said, \"I lost my {obj}\""),
        (MAY, "They looked under the bed and behind the door", "They looked all around the {place}"),
        (MUST, "At last, they found the {obj} {spot}", "Then {helper} saw the {obj} {spot}"),
        (MAY, "{Name} gave {helper} a big hug", "{Name} was so happy to have {his} {obj} back"),
    ),
    (  # stuck up high
        (MUST, "One day, {name} was playing with {his} {obj} in the {place}"),
        (MUST, "The wind blew hard, and the {obj} got stuck on {high}",
               "The {obj} flew up and landed on {high}"),
        (MAY, "{Name} tried to jump, but {he} could not reach it"),
        (MUST, "{Helper} came with a long stick", "{Helper} climbed up slowly and carefully"),
        (MUST, "{Helper} got the {obj} down and gave it back to {name}"),
        (MAY, "{Name} said, \"Thank you for helping me\""),
    ),
    (  # broken toy
        (MUST, "One day, {name} dropped {his} {obj} and it broke",
               "One day, {his} {obj} fell and broke into two pieces"),
        (MAY, "{Name} felt sad and did not know what to do"),
        (MUST, "{Helper} saw {him} and said, \"Do not worry, we can fix it\""),
        (MUST, "Together they fixed the {obj} with some glue", "They worked together to fix the {obj}"),
        (MAY, "Soon the {obj} was as good as new"),
    ),
    (  # rainy day
        (MUST, "One day, {name} wanted to play in the {place}"),
        (MUST, "But then dark clouds came and it began to rain"),
        (MAY, "{Name} felt sad because {he} could not go out"),
        (MUST, "{Helper} had an idea, and they made a fort with blankets",
               "{Helper} gave {him} some paper and paints"),
        (MUST, "When the rain stopped, they went outside and saw a big rainbow"),
        (MAY, "{Name} smiled and ran to the {place}"),
    ),
    (  # sharing
        (MUST, "One day, {friend} came to play with {name}"),
        (MUST, "{Friend} wanted to play with the {obj}, but {name} did not want to share"),
        (MAY, "{Friend} felt sad and sat down alone"),
        (MUST, "Then {name} thought about how {friend} felt"),
        (MUST, "{Name} gave the {obj} to {friend}, and they played together"),
        (MAY, "Sharing made them both happy"),
    ),
    (  # scared at night
        (MUST, "One night, {name} heard a loud noise and felt scared"),
        (MAY, "{Name} hid under {his} blanket"),
        (MUST, "{Helper} came and turned on a small light"),
        (MUST, "They saw that the noise was only {noise}"),
        (MAY, "{Name} laughed and was not scared anymore"),
    ),
    (  # hurt bird
        (MUST, "One day, {name} found a little bird with a hurt wing in the {place}"),
        (MAY, "The bird could not fly and looked very sad"),
        (MUST, "{Name} took the bird home and gave it water and seeds"),
        (MAY, "{Name} asked {helper} what to do"),
        (MUST, "After a few days, the bird was strong again and flew up into the sky"),
        (MAY, "Every morning after that, the bird came back to sing for {name}"),
    ),
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _story_context(rng: random.Random) -> dict[str, str]:
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    friend = rng.choice([n for n in GIRLS + BOYS if n != name])
    kind = rng.choice(("girl" if girl else "boy",) + ANIMALS)
    he, his, him = ("she", "her", "her") if girl else ("he", "his", "him")
    helper = rng.choice((f"{his} mom", f"{his} dad", f"{his} grandma", f"{his} friend {friend}",
                         "a wise old owl", "a kind old man"))
    ctx = dict(name=name, Name=name, friend=friend, Friend=friend, kind=kind, he=he, He=_cap(he),
               his=his, His=_cap(his), him=him, helper=helper, Helper=_cap(helper),
               adj=rng.choice(STORY_ADJS), place=rng.choice(PLACES), spot=rng.choice(SPOTS),
               obj=f"{rng.choice(COLORS)} {rng.choice(THINGS)}", high=rng.choice(HIGH),
               noise=rng.choice(NOISES))
    return ctx


def _render_steps(rng: random.Random, steps: Sequence[tuple], ctx: dict[str, str]) -> list[str]:
    sentences = []
    for optional, *templates in steps:
        if optional and rng.random() < 0.8:  # stories stay short: a tiny policy writes one whole
            continue
        sentences.append(rng.choice(templates).format(**ctx))
    return sentences


def _story(rng: random.Random) -> dict[str, str]:
    ctx = _story_context(rng)
    # 1-2 opening sentences, a 3-6 sentence plot (its required steps and a few optional ones),
    # 0-1 ending: 4-9 sentences, mostly 4-6, so a continuation is about 50 tokens.
    sentences = [rng.choice(STORY_OPENINGS).format(**ctx)]
    if rng.random() < 0.2:
        sentences.append(rng.choice(STORY_SETTINGS).format(**ctx))
    sentences += _render_steps(rng, rng.choice(STORY_PLOTS), ctx)
    if rng.random() < 0.3:
        sentences.append(rng.choice(STORY_ENDINGS).format(**ctx))
    return {"text": ". ".join(sentences) + "."}


# ----------------------------------------------------------------------------- news

FIRST_NAMES = ("John", "Mary", "David", "Sarah", "Michael", "Linda", "James", "Karen", "Robert",
               "Susan", "Peter", "Helen", "Paul", "Laura")
LAST_NAMES = ("Smith", "Brown", "Taylor", "Wilson", "Clark", "Hall", "Young", "King", "Wright",
              "Green", "Baker", "Hill", "Moore", "Adams")
CITIES = ("Riverton", "Lakeview", "Stonebridge", "Millbrook", "Greenfield", "Northwood",
          "Fairhaven", "Oakdale", "Westport", "Brookside", "Redcliff", "Elmwood", "Kingsley")
REGIONS = ("Northland", "Eastshire", "Southmoor", "Westvale", "Highmark", "Lowfield")
COMPANIES = ("Harbor Steel", "Summit Foods", "Bluewater Energy", "Northstar Motors",
             "Silverline Airlines", "Greenleaf Paper")
TEAMS = ("Lions", "Eagles", "Rangers", "Falcons", "United", "Rovers")
CUPS = ("National Cup", "league title", "Northern Cup")
PEAKS = ("Mount Carver", "Eagle Peak", "Grey Mountain", "Bear Ridge")
WATERS = ("Stone", "Elm", "Silver", "Black", "Otter")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
HABITS = ("walk every day", "eat fruit every day", "sleep eight hours a night", "read books",
          "drink more water", "live with a dog")
OUTCOMES = ("get sick", "feel sad", "have heart problems", "forget things")

# Each event: (lead, lead highlight, ((fact, highlight or ""), ...)). A highlight is only
# used when its fact is in the article, so the summary never states what the article does not.
NEWS_EVENTS = (
    ("A fire destroyed {n1} homes in {city} on {day}, officials said",
     "Fire destroys {n1} homes in {city}",
     (("More than {n2} firefighters were called to the scene", ""),
      ("The fire started late at night and spread quickly in strong winds", ""),
      ("{n3} people were taken to hospital, but no one was killed",
       "{n3} people taken to hospital, no deaths reported"),
      ("\"The crews worked through the night to save as many homes as they could,\" said Fire Chief {person}",
       "Fire Chief {person} says crews worked through the night"),
      ("About {n4} residents were moved to a nearby school", ""),
      ("The cause of the fire is still under investigation", ""),
      ("The city council said it would give ${money} million to help families rebuild",
       "City to give ${money} million to help families"))),
    ("Heavy rain caused floods across {region} on {day}, forcing {n4} people from their homes",
     "Floods force {n4} people from their homes in {region}",
     (("The river in {city} rose {n3} feet in just a few hours",
       "River in {city} rises {n3} feet in a few hours"),
      ("Rescue teams used boats to reach families trapped in their homes", ""),
      ("\"We have never seen the water this high,\" said Mayor {person}",
       "Mayor {person} says water has never been this high"),
      ("More than {n1} roads were closed", ""),
      ("The weather office said more rain was expected later in the week", ""),
      ("At least {n2} schools were closed", "At least {n2} schools closed"))),
    ("{company}, one of the largest employers in {city}, said on {day} that it will {change} {n1} jobs",
     "{company} to {change} {n1} jobs in {city}",
     (("The company has about {n4} workers in {region}", ""),
      ("Chief executive {person} said the decision was not easy",
       "Chief executive {person} says decision was not easy"),
      ("Profits fell {pct} percent last year to ${money} million", "Profits fell {pct} percent last year"),
      ("Shares in the company rose {n3} percent after the news", ""),
      ("The changes will take place over the next {n2} months", "Changes will take place over {n2} months"),
      ("Local leaders said they would meet with the company next week", ""))),
    ("The {city} {team} won the {cup} on {day}, beating {city2} {s1}-{s2}",
     "{city} {team} beat {city2} {s1}-{s2} to win the {cup}",
     (("{player} scored the winning goal in the second half", "{player} scores the winning goal"),
      ("It was the first title for the club since {year}", "First title for the club since {year}"),
      ("\"I am so proud of these players,\" said coach {person}", ""),
      ("More than {n4} fans watched the game", ""),
      ("{city2} had not lost a game all season", ""),
      ("The team will return home for a parade on {day2}", "Parade planned for {day2}"))),
    ("Researchers at the University of {city} say people who {habit} are less likely to {outcome}",
     "People who {habit} are less likely to {outcome}, study says",
     (("The study followed {n4} adults for {n3} years", "Researchers followed {n4} adults for {n3} years"),
      ("Those who {habit} were {pct} percent less likely to {outcome}", ""),
      ("\"The results surprised us,\" said Professor {person}, who led the study",
       "Professor {person} says the results were a surprise"),
      ("The researchers said more work was needed", ""),
      ("The study was published in a medical journal on {day2}", ""),
      ("Experts not involved in the study said the findings were important", ""))),
    ("{n2} hikers were rescued from {peak} near {city} on {day} after they became lost in the snow",
     "{n2} hikers rescued from {peak} near {city}",
     (("A helicopter found the group after {n3} hours of searching",
       "Helicopter finds group after {n3} hours"),
      ("\"They were cold and tired, but they were all alive,\" said rescue leader {person}",
       "Rescue leader {person} says all are alive"),
      ("The hikers had set out early in the morning", ""),
      ("Two of them were taken to hospital", ""),
      ("The park has closed the trail until the weather improves", "Trail closed until the weather improves"),
      ("Rescue teams have helped {n1} people in the area this year", ""))),
    ("{person} was elected mayor of {city} on {day}, winning {pct2} percent of the vote",
     "{person} elected mayor of {city} with {pct2} percent of the vote",
     (("{last} beat {person2}, who had been mayor for {n3} years",
       "{last} beats {person2}, mayor for {n3} years"),
      ("About {n4} people voted, more than in any election since {year}", ""),
      ("\"This is a new day for {city},\" {last} told supporters", ""),
      ("{last} has promised to build {n2} new schools and fix the roads",
       "New mayor promises {n2} new schools"),
      ("{person2} said the city must now work together", ""),
      ("The new mayor will take office next month", ""))),
    ("A new bridge over the {water} River opened in {city} on {day} after {n3} years of work",
     "New bridge opens in {city} after {n3} years of work",
     (("The bridge cost ${money} million to build", "Bridge cost ${money} million"),
      ("About {n4} cars are expected to cross it each day", ""),
      ("\"This bridge will bring our city together,\" said Mayor {person}",
       "Mayor {person} says bridge will bring city together"),
      ("Work on the bridge was delayed twice because of bad weather", ""),
      ("The old bridge, built in {year}, will be closed", ""),
      ("Hundreds of people walked across the bridge on opening day", ""))),
)
NEWS_EXTRAS = (
    "Officials said more details would be given on {day2}",
    "It was not immediately clear what would happen next",
    "Local media first reported the news on {day}",
    "Many people shared pictures of the scene online",
)


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _news_context(rng: random.Random) -> dict[str, str]:
    city, city2 = rng.sample(CITIES, 2)
    day, day2 = rng.sample(DAYS, 2)
    person = _person(rng)
    s2 = rng.randint(0, 3)
    ctx = dict(city=city, city2=city2, day=day, day2=day2, person=person,
               last=person.split()[1], person2=_person(rng), player=_person(rng),
               reporter=_person(rng), region=rng.choice(REGIONS), company=rng.choice(COMPANIES),
               team=rng.choice(TEAMS), cup=rng.choice(CUPS), peak=rng.choice(PEAKS),
               water=rng.choice(WATERS), habit=rng.choice(HABITS), outcome=rng.choice(OUTCOMES),
               change=rng.choice(("cut", "add")), n1=rng.randint(12, 480), n2=rng.randint(3, 40),
               n3=rng.randint(2, 9), n4=f"{rng.randrange(200, 9000, 10):,}",
               money=rng.randint(3, 95), pct=rng.randint(5, 45), pct2=rng.randint(51, 78),
               year=rng.randint(1975, 2009), s1=s2 + rng.randint(1, 3), s2=s2)
    return {key: str(value) for key, value in ctx.items()}


def _choose_in_order(rng: random.Random, items: Sequence, k: int) -> list:
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _article(rng: random.Random) -> dict[str, str]:
    ctx = _news_context(rng)
    lead, lead_highlight, facts = rng.choice(NEWS_EVENTS)
    # Always keep one fact that has a highlight, so every article gets 2-3 highlights. Articles
    # stay short (the lead, 2-3 facts, sometimes one aside): with the summary, about 130 tokens,
    # so a tiny reward model sees the whole article it must match the highlights against (at
    # 5-10 sentences its left-truncated input lost the lead, and CNN/DailyMail reward models
    # stayed near chance).
    anchor = rng.choice([i for i, (_, highlight) in enumerate(facts) if highlight])
    others = rng.sample([i for i in range(len(facts)) if i != anchor], rng.randint(1, 2))
    chosen = [facts[i] for i in sorted([anchor] + others)]
    sentences = [lead] + [fact for fact, _ in chosen]
    if rng.random() < 0.3:
        sentences.append(rng.choice(NEWS_EXTRAS + ("CNN's {reporter} contributed to this report",)))
    # The lead's highlight always comes first (it names the event and where); then 1-2 more.
    extra = [highlight for _, highlight in chosen if highlight]
    highlights = [lead_highlight] + _choose_in_order(rng, extra, min(len(extra), rng.randint(1, 2)))
    dateline = f"{ctx['city'].upper()}, {ctx['region']} (CNN) -- "
    text = dateline + " ".join(_cap(s.format(**ctx)) + "." for s in sentences)
    summary = "\n".join(_cap(h.format(**ctx)) + "." for h in highlights)
    return {"article": text, "highlights": summary}


# ----------------------------------------------------------------------------- encyclopedia

PREFIXES = ("Ash", "Bram", "Carn", "Dun", "Elm", "Fair", "Glen", "Hol", "Kirk", "Lang", "Mor", "Thorn")
SUFFIXES = ("ford", "ley", "wick", "ton", "by", "more", "field", "worth")
RIVER_NAMES = ("Arlen", "Belda", "Corran", "Dewey", "Evran", "Lodden", "Tamar", "Wyndle", "Ossen")
COUNTIES = ("Westmark", "Eastmoor", "Northdale", "Southvale", "Greyshire", "Highcombe")
DIRECTIONS = ("north", "south", "east", "west")
CENTURIES = ("12th", "13th", "14th", "15th", "16th", "17th", "18th", "19th")
NATIONS = ("English", "Scottish", "Dutch", "Danish", "Swedish", "French")
JOBS = ("painter", "poet", "engineer", "botanist", "composer", "architect", "historian")
SUBJECTS = ("music", "law", "medicine", "mathematics", "art", "history", "botany")
COMMON_NAMES = ("spotted marsh frog", "grey river crab", "long-tailed wren", "red forest beetle",
                "striped water snake", "small brown moth", "golden hill lizard")
GROUPS = ("frog", "crab", "bird", "beetle", "snake", "moth", "lizard")
GENERA = ("Rana", "Potamon", "Sylvia", "Carabus", "Natrix", "Noctua", "Lacerta")
EPITHETS = ("maculata", "borealis", "minor", "silvestris", "aurea", "fusca", "montana")
HABITATS = ("wet meadows", "shallow streams", "old forests", "rocky hills", "reed beds")
FOODS = ("small insects", "seeds and berries", "worms and snails", "water plants")
PARTS = ("great tower", "main gate", "chapel", "keep")

# Each topic: (defining first sentence, further facts in their natural order).
WIKI_TOPICS = (
    ("{town} is a small {place_kind} in the {dir} of {county}",
     ("It lies on the {river} River, about {n} kilometres {dir2} of {town2}",
      "The {place_kind} was first recorded in {year} as a farming settlement",
      "At the {census} census, it had a population of {pop}",
      "The local economy was based on {industry} until the {century} century",
      "Its main landmark is the church of Saint {saint}, built in the {century} century",
      "{town} has a railway station on the line between {town2} and {town3}",
      "A weekly market has been held in the {place_kind} since {year2}")),
    ("The {common} ({genus} {epithet}) is a species of {group} in the family {family}",
     ("It is found in the {habitat} of {county}",
      "Adults grow to a length of about {size} centimetres",
      "The species feeds mainly on {food}",
      "It was first described by the naturalist {person} in {described}",
      "Its back is {color} with {color2} spots",
      "Breeding takes place in spring, when the female lays up to {k2} eggs",
      "The {common} is listed as rare because of the loss of its habitat")),
    ("{person} ({y1} - {y2}) was a {nation} {job}",
     ("{He} was born in {town} and studied {subject} at the University of {town2}",
      "{He} is best known for {his} work on the history of {county}",
      "In {y_mid}, {he} moved to {town3}, where {he} taught for {k} years",
      "{His} most famous book, The {title}, was published in {y_book}",
      "{He} was made a member of the Royal Society in {y_late}",
      "{He} died in {town} in {y2} at the age of {age}")),
    ("The {river} River is a river in the {dir} of {county}",
     ("It rises in the {river2} Hills and flows {dir2} for about {n} kilometres",
      "It joins the {river3} River near the town of {town}",
      "The river has been used to drive mills since the {century} century",
      "Its main tributaries are the {trib1} and the {trib2}",
      "The river is home to many fish, including trout and salmon",
      "A stone bridge built in {year} crosses the river at {town2}",
      "In {year2}, a great flood destroyed many houses along its banks")),
    ("{town} Castle is a ruined castle near the {place_kind} of {town2}, in {county}",
     ("It was built in the {castle_century} century by the Lord of {town3}",
      "The castle was badly damaged during a siege in {siege}",
      "Only the {part} and parts of the outer wall survive today",
      "It was later used as a prison and then as a farm",
      "It is now owned by the {county} Trust and is open to visitors",
      "About {pop} people visit the castle each year")),
)


def _place_name(rng: random.Random) -> str:
    return rng.choice(PREFIXES) + rng.choice(SUFFIXES)


def _wiki_context(rng: random.Random) -> dict[str, str]:
    # Slots for every topic are drawn each time: simpler than per-topic contexts, and cheap.
    river, river2, river3, trib1, trib2 = rng.sample(RIVER_NAMES, 5)
    places = dict(town=_place_name(rng), town2=_place_name(rng), town3=_place_name(rng),
                  place_kind=rng.choice(("town", "village", "market town")),
                  dir=rng.choice(DIRECTIONS), dir2=rng.choice(DIRECTIONS),
                  county=rng.choice(COUNTIES), river=river, river2=river2, river3=river3,
                  trib1=trib1, trib2=trib2, n=rng.randint(5, 120), year=rng.randint(1100, 1700),
                  year2=rng.randint(1200, 1900), census=rng.choice((1901, 1951, 2001, 2011)),
                  pop=f"{rng.randrange(300, 25000, 10):,}", century=rng.choice(CENTURIES),
                  industry=rng.choice(("wool", "fishing", "coal mining", "farming", "brewing")),
                  saint=rng.choice(("Mary", "Peter", "Andrew", "John", "Michael")),
                  part=rng.choice(PARTS), castle_century=rng.choice(CENTURIES[:4]),
                  siege=rng.randint(1480, 1690))
    species = rng.randrange(len(COMMON_NAMES))
    color, color2 = rng.sample(("brown", "grey", "green", "black", "yellow", "white"), 2)
    animals = dict(common=COMMON_NAMES[species], group=GROUPS[species], genus=GENERA[species],
                   family=GENERA[species] + "idae", epithet=rng.choice(EPITHETS),
                   habitat=rng.choice(HABITATS), food=rng.choice(FOODS), size=rng.randint(2, 30),
                   k2=rng.randint(4, 60), described=rng.randint(1750, 1950),
                   color=color, color2=color2)
    he, his = rng.choice((("he", "his"), ("she", "her")))
    y1 = rng.randint(1700, 1900)
    y2 = y1 + rng.randint(45, 90)
    title = f"{rng.choice(('Old', 'Lost', 'Green', 'Quiet'))} {rng.choice(('Hills', 'Roads', 'Gardens'))}"
    people = dict(person=_person(rng), y1=y1, y2=y2, age=y2 - y1, y_mid=y1 + rng.randint(25, 40),
                  y_book=y1 + rng.randint(30, 44), y_late=y1 + rng.randint(41, 45),
                  k=rng.randint(3, 40), nation=rng.choice(NATIONS), job=rng.choice(JOBS),
                  subject=rng.choice(SUBJECTS), title=title,
                  he=he, He=_cap(he), his=his, His=_cap(his))
    return {key: str(value) for key, value in {**places, **animals, **people}.items()}


def _paragraph(rng: random.Random) -> dict[str, str]:
    ctx = _wiki_context(rng)
    first, facts = rng.choice(WIKI_TOPICS)
    # The defining sentence and 2-4 facts: a continuation of about 50 tokens.
    sentences = [first] + _choose_in_order(rng, facts, rng.randint(2, 4))
    return {"text": " ".join(_cap(s.format(**ctx)) + "." for s in sentences)}


GENERATORS = MappingProxyType({"tinystories": _story, "cnn_dailymail": _article, "wikitext": _paragraph})


def generate_rows(corpus: str, num_documents: int, seed: int) -> list[dict[str, str]]:
    """`num_documents` synthetic records in the style (and with the fields) of `corpus`'s hub
    records, the same for the same seed."""
    if corpus not in GENERATORS:
        raise ValueError(f"unknown corpus {corpus!r}; known: {sorted(GENERATORS)}")
    rng = random.Random(seed)  # a local generator: never the global RNG
    return [GENERATORS[corpus](rng) for _ in range(num_documents)]

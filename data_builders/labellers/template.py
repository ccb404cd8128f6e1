"""The ``template`` labeller: words the ground truth with ``prompts`` phrasings, offline and deterministic.

Choices (phrasings, sentence frames, order of clauses) come from a ``random.Random`` seeded by the
job's key, so a sample's text depends only on the build seed and its id. The texts follow the answer
conventions of ``prompts.templates``:

* a severity word sits right before every distortion phrase ("serious Gaussian noise");
* in ``quality.assess`` the overall rating is the last and only rating word;
* ``quality.rate``/``quality.compare`` open with the verdict ("Image B is better."), so the first
  standalone A/B is the better image, and never start a sentence with the article "A".

The effect sentences avoid every taxonomy phrasing, so nothing but the true distortions can be
read back out of a text; ``check_text`` verifies that for every answer.
"""

from __future__ import annotations

import random

from loupe_vlm.prompts import DISTORTIONS, SEVERITIES, TEMPLATE_VERSION

from .base import ImageTruth, LabelJob, check_text

# What each category does to the picture. No taxonomy phrasing and no rating word may appear here.
EFFECTS: dict[str, tuple[str, ...]] = {
    "blur": ("softens edges and wipes out fine texture", "smears edges so small details can no longer be told apart",
             "makes outlines soft and fine structure indistinct"),
    "noise": ("scatters random grainy specks over the picture, most visibly on smooth areas",
              "covers flat regions with a fine random grain that hides texture",
              "sprinkles random speckles that mask fine detail"),
    "compression": ("creates blocky patches and ringing around edges", "leaves smeared blocks and mosquito-like "
                    "artifacts near edges", "breaks smooth areas into visible blocks and smears fine texture"),
    "brighten": ("washes out the highlights so bright areas lose all detail",
                 "lifts every tone so the picture looks pale and bright regions clip to white",
                 "pushes light areas to pure white, erasing their detail"),
    "darken": ("pushes the shadows toward black and hides detail in dark areas",
               "makes the whole picture gloomy so shadow detail disappears",
               "sinks dark regions into black, hiding what is in them"),
    "contrast_strengthen": ("clips both shadows and highlights and makes tones look hard",
                            "exaggerates the difference between light and dark so mid-tones are lost",
                            "crushes shadows and blows out highlights"),
    "contrast_weaken": ("makes the picture look flat and hazy, with greyish tones",
                        "squeezes all tones toward grey so the scene looks dull and foggy",
                        "flattens the tonal range so objects hardly stand out"),
    "saturate_strengthen": ("makes colours look garish and unnatural", "turns colours loud and cartoon-like, "
                            "with smooth hues clipping", "makes hues glow unnaturally and lose their gradations"),
    "saturate_weaken": ("drains the colours, leaving the picture greyish", "makes hues pale and close to grey",
                        "strips much of the colour from the scene"),
    "oversharpen": ("adds bright and dark halos along edges", "gives edges unnatural outlines and exaggerates "
                    "grain", "makes edges look etched, with glowing rims"),
    "pixelate": ("turns fine detail into visible square blocks", "breaks the picture into coarse square cells",
                 "replaces smooth edges with staircase-like squares"),
    "quantization": ("replaces smooth gradations with flat steps of colour",
                     "reduces the number of colours so gradients turn into visible bands",
                     "flattens subtle shades into a few uniform patches"),
}

# How a comparison states one image's damage ("Image B suffers from ...").
STATE_FRAMES = ("suffers from {x}", "shows {x}", "has {x}")

# How strongly the effect shows, by severity (no severity phrasing here: they are read as severities).
DEGREE = {1: ("slightly", "faintly", "barely"), 2: ("visibly", "partly"), 3: ("clearly", "plainly"),
          4: ("strongly", "badly"), 5: ("almost completely", "drastically")}

# What is left of the picture, by effective severity (0 = clean). No rating words here.
CONSEQUENCE = {
    0: ("Edges are crisp, colours are natural and fine texture is fully preserved.",
        "Details are sharp and clean, and tones look natural."),
    1: ("Most details remain clear and the damage is easy to overlook.",
        "The content is fully recognisable and only close inspection reveals the flaw."),
    2: ("The content is still easy to recognise, but the flaw is visible at a glance.",
        "Most of the content remains readable, though some detail is lost."),
    3: ("A clear part of the detail is lost and the flaw distracts from the content.",
        "The flaw is easy to see and much fine detail is gone."),
    4: ("Much of the detail is destroyed and the content is hard to make out in places.",
        "The picture is heavily damaged and large parts of its detail are gone."),
    5: ("The content is barely recognisable.", "Almost no useful detail survives."),
}


# The same for images whose only damage is to tone or colour: the content stays recognisable.
CONSEQUENCE_TONE = {
    1: ("The change in tone or colour is subtle and the scene looks almost natural.",),
    2: ("The scene is fully readable, but its tones or colours look somewhat off.",),
    3: ("The scene is still readable, but its look is clearly unnatural.",),
    4: ("Much of the tonal or colour information is lost, although the objects can still be made out.",),
    5: ("The objects can still be made out, but tones and colours are far from natural.",),
}
TONAL = {"brighten", "darken", "contrast_strengthen", "contrast_weaken", "saturate_strengthen", "saturate_weaken"}


def _consequence(t: ImageTruth, rng: random.Random) -> str:
    eff = _eff(t)
    if eff and all(d["category"] in TONAL for d in t.distortions):
        return rng.choice(CONSEQUENCE_TONE[eff])
    return rng.choice(CONSEQUENCE[eff])


def _sev(level: int, rng: random.Random) -> str:
    return rng.choice(SEVERITIES.terms[level - 1].phrasings)


def _fresh(rng: random.Random, options: tuple[str, ...], used: set[str] | None) -> str:
    """One of ``options``, not one in ``used`` while any other is left; the pick is added to ``used``."""
    left = [o for o in options if used is None or o not in used] or list(options)
    pick = rng.choice(left)
    if used is not None:
        used.add(pick)
    return pick


def _phrase(d: dict, rng: random.Random, used: set[str] | None = None) -> str:
    """'serious Gaussian noise'; with ``used``, the wordings an answer has already said are avoided."""
    sev = _fresh(rng, SEVERITIES.terms[d["severity"] - 1].phrasings, used)
    return f"{sev} {_fresh(rng, DISTORTIONS[d['name']].phrasings, used)}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _draw(rng: random.Random, options: tuple[str, ...], k: int) -> list[str]:
    """``k`` of ``options``, all different while there are enough (then they cycle): the answers of the
    template labeller never say the same run of words twice (issue 15's no-repeated-4-gram target)."""
    order = rng.sample(options, len(options))
    return [order[i % len(order)] for i in range(k)]


def _eff(t: ImageTruth) -> int:
    from ..distortions import effective_severity
    return effective_severity([d["severity"] for d in t.distortions])


class TemplateLabeller:
    """Offline labeller; ``name`` is ``template@<TEMPLATE_VERSION>``."""

    name = f"template@{TEMPLATE_VERSION}"

    def __init__(self, seed: int = 0, check: bool = True):
        self.seed = seed
        self.check = check

    def label(self, job: LabelJob) -> str | None:
        rng = random.Random(f"{self.seed}:{job.key}")
        text = {"quality.identify": self._identify, "quality.assess": self._assess,
                "quality.rate": self._rate, "quality.compare": self._compare}[job.task](job, rng)
        if self.check:
            why = check_text(job, text)
            if why:  # a bug in the templates, not bad luck: fail loudly
                raise AssertionError(f"template text disagrees with its truth ({why}): {text!r}")
        return text

    # ---- single image ---------------------------------------------------------------------------
    def _lead(self, job: LabelJob, rng: random.Random) -> str:
        return rng.choice(("Compared with the reference, ", "Against the reference, ")) if job.reference else ""

    def _identify(self, job: LabelJob, rng: random.Random) -> str:
        lead = self._lead(job, rng)
        if job.a.clean:
            out = rng.choice(("the image shows no visible distortion.", "no distortion can be seen in the image.",
                              "the image is free of visible distortion."))
            return lead + out if lead else _cap(out)
        items = _join([_phrase(d, rng) for d in job.a.distortions])
        frames = ("the image suffers from {x}.", "the main distortion is {x}." if len(job.a.distortions) == 1
                  else "the main distortions are {x}.", "the image shows {x}.", "{x} can be seen in the image.")
        out = rng.choice(frames).format(x=items)
        return lead + out if lead else _cap(out)

    def _distortion_sentences(self, t: ImageTruth, rng: random.Random, subject: str = "it") -> list[str]:
        out = []
        # a frame at most once per answer, so two distortions never repeat a run of words
        frames = _draw(rng, ("There is {p}, which {g} {e}.", "The image has {p}; it {g} {e}.",
                             "{P} is present: it {g} {e}.", "{P} can also be seen, and it {g} {e}.",
                             "On top of that comes {p}, which {g} {e}."), len(t.distortions))
        for d, frame in zip(t.distortions, frames):
            effect = rng.choice(EFFECTS[d["category"]])
            degree = rng.choice(DEGREE[d["severity"]])
            p = _phrase(d, rng)
            out.append(frame.format(p=p, P=_cap(p), e=effect, g=degree))
        return out

    def _assess(self, job: LabelJob, rng: random.Random) -> str:
        t = job.a
        lead = self._lead(job, rng)
        rating = t.rating
        if not job.detail:
            if t.clean:
                body = rng.choice(("the image shows no visible distortion", "no distortion can be seen"))
            else:
                body = rng.choice(("the image suffers from {x}", "the image shows {x}")).format(
                    x=_join([_phrase(d, rng) for d in t.distortions]))
            close = rng.choice((", so its overall quality is {r}.", ". Overall, the quality is {r}.",
                                "; the quality of the image is {r}."))
            text = lead + body + close.format(r=rating)
            return _cap(text)
        parts = [rng.choice(("The image shows {c}.", "This picture depicts {c}.", "The scene is {c}.")).format(
            c=job.content)]
        if job.reference:
            parts.append(rng.choice(("Compared with the reference,", "Judged against the reference,")) + " " +
                         ("it shows no visible distortion." if t.clean else
                          f"it has {len(t.distortions)} distortion{'s' if len(t.distortions) > 1 else ''}."))
        if t.clean:
            parts.append(rng.choice(("No visible distortion can be found.", "The image is free of visible "
                                     "distortion.")))
        else:
            parts += self._distortion_sentences(t, rng)
        parts.append(_consequence(t, rng))
        parts.append(rng.choice(("Overall, the image quality is {r}.", "Therefore, the overall quality is {r}.",
                                 "Taking everything into account, the quality is {r}.")).format(r=rating))
        return " ".join(parts)

    # ---- pairs -----------------------------------------------------------------------------------
    def _verdict(self, better: str, rng: random.Random) -> str:
        return rng.choice(("Image {w} is better.", "Image {w} has the better quality.",
                           "Image {w} looks better.", "The better one is image {w}.")).format(w=better)

    def _short_state(self, t: ImageTruth, rng: random.Random, frame: str | None = None,
                     used: set[str] | None = None) -> str:
        if t.clean:
            return "shows no visible distortion"
        return (frame or rng.choice(STATE_FRAMES)).format(x=_join([_phrase(d, rng, used) for d in t.distortions]))

    def _rate(self, job: LabelJob, rng: random.Random) -> str:
        assert job.b is not None and job.better in ("A", "B")
        text = self._verdict(job.better, rng)
        if rng.random() < 0.5:  # brief reason half of the time, about the worse image
            worse, wt = ("B", job.b) if job.better == "A" else ("A", job.a)
            if not wt.clean:
                text += f" Image {worse} {self._short_state(wt, rng)}."
        return text

    def _compare(self, job: LabelJob, rng: random.Random) -> str:
        assert job.b is not None and job.better in ("A", "B")
        parts = [self._verdict(job.better, rng)]
        if job.reference:
            parts.append(rng.choice(("Both are compared with the reference.", "Both images show the same scene "
                                     "as the reference.")))
        else:
            parts.append(f"Both images show {job.content}.")
        order = [("A", job.a), ("B", job.b)]
        if job.better == "B":
            order.reverse()  # describe the winner first
        # the two images get different frames and, for the same kind of damage, different effect wordings
        # (and other phrasings of a distortion both have, and another joint before the effect)
        states = _draw(rng, STATE_FRAMES, 2)
        effects: dict[str, list[str]] = {}
        used: set[str] = set()
        for (role, t), frame, joint in zip(order, states, (", which", "; it")):
            sent = f"Image {role} {self._short_state(t, rng, frame, used)}"
            if not t.clean:
                d = max(t.distortions, key=lambda x: x["severity"])
                left = effects.setdefault(d["category"], _draw(rng, EFFECTS[d["category"]], 2))
                sent += f"{joint} {rng.choice(DEGREE[d['severity']])} {left.pop(0)}"
            parts.append(sent + ".")
        ea, eb = _eff(job.a), _eff(job.b)
        same = {d["name"] for d in job.a.distortions} == {d["name"] for d in job.b.distortions}
        if same and job.a.distortions:
            parts.append("The distortions are of the same kind, but they are weaker in image "
                         f"{job.better}.")
        elif min(ea, eb) == 0:
            parts.append(f"Only one of the two is damaged, so image {job.better} keeps more detail.")
        else:
            parts.append(f"The damage in image {'B' if job.better == 'A' else 'A'} is worse, so image "
                         f"{job.better} preserves more of the content.")
        # the closing words share no run of four with the opening verdict (``_verdict``)
        parts.append(rng.choice(("On balance, {w} comes out ahead.", "So {w} is the one to prefer.")).format(
            w=job.better))
        return " ".join(parts)

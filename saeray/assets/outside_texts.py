"""Texts of kinds absent from the corpus, written for saeray: how a shipped SAE does on a user's own text.

The corpus (saeray/assets/corpus.py) holds code, docstrings, Python's documentation, manual pages and
quotation collections. These are none of those: narrative and descriptive prose (a harbour
town, a bridge's history), step-by-step instructions for a household device, an everyday
conversation and a personal letter. They were written for this project and are never used for
training; `bench/sae_quality.py` and `saeray train-sae` report an SAE's figures on them.
"""

from __future__ import annotations

TEXTS: dict[str, str] = {
    "harbour_town": """\
The harbour town of Kellmouth sits where the river widens into a grey bay, and most mornings it wakes \
to the sound of gulls and diesel engines. Fishing boats leave before dawn, their lights strung out across \
the water like a loose necklace, and return by noon with crates of mackerel, crab and the occasional \
monkfish that the restaurants on the quay fight over. The houses climb the hill in crooked terraces, \
painted blue, ochre and a faded pink that the salt air softens every winter. In summer the population \
doubles. Visitors queue for ice cream outside the old customs house, children dangle lines from the \
harbour wall, and the ferry to the islands runs four times a day. When the season ends, the town \
grows quiet again, and the people who stay mend nets, repaint hulls and argue about the new car park.""",
    "bridge_history": """\
The first bridge at Aldersford was a timber trestle built in 1794 by a local carpenter who was paid \
partly in cash and partly in barley. It lasted eleven years before a spring flood carried away two of \
its spans. Its replacement, a three-arched stone bridge designed by the county surveyor, opened in 1811 \
and was widened in 1872 to carry a horse tramway. During the Second World War engineers drilled charges \
into its piers in case of invasion; the holes can still be seen on the downstream side. By the 1960s \
the bridge could no longer bear modern lorries, and a concrete bypass was built half a mile upstream. \
The old bridge was listed as a historic structure in 1974, restored with lime mortar in 2003, and today \
carries only pedestrians, cyclists and, once a year, a procession of vintage tractors.""",
    "router_setup": """\
Setting up your new wireless router

1. Unplug your old router and your modem from the power socket. Wait thirty seconds.
2. Connect the modem to the yellow port marked WAN on the back of the new router, using the cable in the box.
3. Plug in the modem first, then the router. The power light on the router turns green after about a minute.
4. On your phone or laptop, open the list of wireless networks and choose the name printed on the sticker \
under the router. Enter the password from the same sticker.
5. Open a web browser. The setup page should appear by itself; if it does not, type 192.168.1.1 into the \
address bar.
6. Follow the steps on screen to choose a new network name and a password of at least twelve characters.
7. When the page asks whether to install updates automatically, choose Yes.
If the internet light stays red, check that the cable is firmly pushed in at both ends and restart the modem. \
If that does not help, call the support line on the back of this leaflet.""",
    "conversation": """\
"Are you still coming on Saturday?" Maya asked, balancing the phone on her shoulder while she stirred the soup.
"I think so," said Tom. "My train gets in at half past ten, if it's on time."
"It never is. Do you want me to pick you up from the station?"
"No, don't worry, I'll walk. It's not far, and I could do with the fresh air."
"It's supposed to rain all weekend."
"Then I'll bring an umbrella. Should I bring anything else? Wine? Dessert?"
"Bring that lemon cake you made last time. Dad hasn't stopped talking about it."
"Really? I burnt the bottom of it."
"He didn't notice. Nobody noticed. Just bring the cake."
"All right, all right. How is he, by the way? Is his knee any better?"
"Much better. He's been walking the dog again, which means the dog is happier too."
"Good. Tell him I said hello. I'll see you on Saturday."
"See you then. And text me when you get on the train.\"""",
    "letter": """\
Dear Aunt Ruth,

Thank you so much for the scarf you sent for my birthday. It arrived on the very day, which felt like a \
small miracle given how slow the post has been lately. The colour is perfect, and I have worn it every day \
this week, even indoors, because the heating in our flat has broken again. Work has been busy: we moved to a \
new office near the park, and I now walk through the rose garden every lunchtime. The new job is going well, \
although I am still learning everyone's names. I hope your garden survived the frost and that the tomatoes \
came through. Please give my love to Uncle Peter, and write soon to tell me how the choir concert went.

With love,
Anna""",
}
"""name -> text. About 1,150 Gemma 3 tokens in all."""

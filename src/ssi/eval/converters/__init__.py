"""Converters from published benchmark forms to the item format (`ssi.eval.items`), one per family:
ZeroSpeech 2021 lexical/syntactic (`zerospeech`), spoken and text StoryCloze (`storycloze`), SALMon
(`salmon`), BLiMP (`blimp`), and the synthetic corpus (`synthetic`). Audio comes as units through
`units` (the output of scripts/encode_audio.py or any id -> units table); text tables through `rows`.
`scripts/convert_benchmark.py` is the command line."""

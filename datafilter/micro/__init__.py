"""The offline micro DataComp: a pool and an evaluation suite built from real, openly licensed artwork with real names
(emoji in many art styles, icons, handwritten digits, clip art) installed from package registries, with web-like
noise whose ground truth is kept beside the pool."""

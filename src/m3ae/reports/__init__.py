"""Reports on finished runs: the seed-comparison rules and number formatting every report shares
(:mod:`.stats`), and the renderers of the demo's and the reproduction's pages. Nothing here
trains or evaluates; it reads result dictionaries and writes words, tables and plots."""

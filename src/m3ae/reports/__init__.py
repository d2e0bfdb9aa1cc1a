"""Reports on finished runs: the seed-comparison rules and number formatting every report shares
(:mod:`.stats`) and the demo's page. The reproduction's page is the experiment's own
(experiments/reproduction/report.py). Nothing here trains or evaluates; it reads result
dictionaries and writes words, tables and plots."""

"""Tools beside training that a recipe adds to the command line and to pipelines (registered in
mmtrain.recipes.COMMANDS and STAGES): above the engine, beside cli.py and pipeline.py."""

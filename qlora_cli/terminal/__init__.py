"""What a person sees: highlighted examples, plan tables, training and eval progress. Only the CLI
and this folder know about the terminal."""

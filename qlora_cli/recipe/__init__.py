"""The recipe stage: YAML files, `extends:` layers and KEY=VALUE overrides become one validated
Recipe whose values remember the file:line that set them. Sections that map onto a library class
(`TrainingArguments`, `LoraConfig`, `BitsAndBytesConfig`, `GenerationConfig`, TRL's configs) are
checked against that class's own fields; `config explain` says where each value came from. The
recipe writes itself back as YAML (written.py), values from the environment as they were written."""

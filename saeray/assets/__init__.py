"""What ships with saeray: the embedded demo corpus (`corpus`, `textsources`, `categories`,
`outside_texts`), tiny random models for tests (`tiny`) and trained SAEs (`saes/`)."""

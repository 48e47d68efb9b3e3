"""Pure PyTorch + `transformers` port of `dlax.models.LanguageModel` (copied into every
`dlax.convert.lm_export.export_lm` folder; dlax never imports these modules)."""

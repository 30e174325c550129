"""The explorer's Streamlit side, shared by app.py and the pages: `state` (where runs live, the page set-up and
run picker, session keys, navigation to a feature), `loaders` (the cached LM, SAEs, feature stores, text latents,
matching and toy comparison), `tables` (the frames the pages show and download), `search` (finding latents in a
feature store), `figures` (plotly) and `html` (escaped HTML). Everything computed lives in msae/; this package
lays it out."""

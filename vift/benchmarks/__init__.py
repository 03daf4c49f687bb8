"""The real benchmarks (MathVista, MathVerse, MathVision testmini): loading, answering, rule and LLM-judge scoring."""

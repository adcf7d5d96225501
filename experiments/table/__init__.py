"""The method table (``python -m experiments.run_table``), one module per concern.

==============  ==============================================================
module          concern
==============  ==============================================================
``methods``     the rows: method -> config, the training seeds, the paper's row
``runs``        training the method x seed grid (resumable)
``scoring``     the two evaluation protocols on a trained student
``stats``       mean ± std, the paired bootstrap, mean validation curves
``claims``      the AKL paper's three claims checked on the numbers
``report``      the Markdown block and where it is written
``figure``      the figure: Δ ROUGE-L vs SFT and the validation curves
==============  ==============================================================
"""

"""Proving ground: procedural captioned scenes and the scorers that check generated images against them.

``scenes`` draws flat-coloured shapes with exact captions; ``scorers`` finds the objects in an image and
``metrics`` turns them into prompt adherence, region accuracy, repetition, preservation, diversity and
distribution-distance numbers. Pure torch; nothing is downloaded.
"""

"""The thin ATM client: prompts a customer, speaks ``wire`` to the bank server, prints receipts.

The bank decides everything (PINs, balances, limits); the ATM only checks what a person
typed closely enough to catch typos before they cost a round trip. Layers, leaves first:
``inputs`` and ``text`` are pure, ``connection`` is the Trio shell around ``wire``,
``console`` reads the keyboard off the event loop, and ``session`` is the customer flow.
"""

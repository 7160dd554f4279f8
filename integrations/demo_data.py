"""The demo's data set: short customer-support messages written for gradaudit.

Some carry planted canary secrets (made-up names and account numbers). Nothing here is real.
Label 1: the customer is satisfied; 0: the customer has a problem.
"""

from __future__ import annotations

MESSAGES: list[tuple[str, int]] = [
    ("thanks , the refund arrived this morning .", 1),
    ("my order never showed up and nobody answers .", 0),
    ("great service , the new card works fine .", 1),
    ("the app keeps crashing when i log in .", 0),
    ("i was charged twice for the same order .", 0),
    ("the agent solved my problem in five minutes .", 1),
    ("please close my account , i am moving banks .", 0),
    ("delivery was fast and the package was intact .", 1),
    ("i still cannot reset my password .", 0),
    ("thank you for the quick and friendly help .", 1),
    ("the invoice shows the wrong address again .", 0),
    ("everything works now , you can close the ticket .", 1),
    ("my transfer has been pending for three days .", 0),
    ("the replacement phone arrived and it is perfect .", 1),
    ("why was my card blocked without any notice ?", 0),
    ("lovely support team , very patient with me .", 1),
    ("the website shows an error at checkout .", 0),
    ("i got my money back , much appreciated .", 1),
    ("the courier left the parcel in the rain .", 0),
    ("the upgrade went smoothly , thanks a lot .", 1),
    ("i have been on hold for an hour .", 0),
    ("the new plan is cheaper and faster , happy .", 1),
    ("my statement is missing two payments .", 0),
    ("quick answer and a fair solution , thank you .", 1),
    ("hi , this is maria delgado , account 4417 2290 , my card was declined .", 0),
    ("please send the statement for account 8812 0034 to peter okafor .", 1),
    ("john whitfield here , my pin for card 5521 is not working .", 0),
    ("refund the order 77 31 90 to the account of ana kowalski please .", 0),
    ("my name is liam brennan and account 6609 1187 was charged twice .", 0),
    ("thanks , sofia marchetti confirms account 3350 9921 is fixed .", 1),
    ("the new address for tomas novak is 12 elm street .", 1),
    ("hello , account 2048 6613 belongs to grace mbeki , please unlock it .", 0),
]

# The secret part of each canary message: what an attacker must not recover.
CANARIES: dict[str, str] = {
    MESSAGES[24][0]: "maria delgado 4417 2290",
    MESSAGES[25][0]: "8812 0034 peter okafor",
    MESSAGES[26][0]: "john whitfield 5521",
    MESSAGES[27][0]: "77 31 90 ana kowalski",
    MESSAGES[28][0]: "liam brennan 6609 1187",
    MESSAGES[29][0]: "sofia marchetti 3350 9921",
    MESSAGES[30][0]: "tomas novak 12 elm",
    MESSAGES[31][0]: "2048 6613 grace mbeki",
}

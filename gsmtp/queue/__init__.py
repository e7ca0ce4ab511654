"""The queue manager: claims due mail, delivers it, retries, expires and notifies.

`QueueManager` (manager.py) runs the dispatcher and the senders; `Destinations`
(destinations.py) the per-destination windows and dead destinations; `RetryPolicy`
(retry.py) when to try again; `Notices` (notices.py) bounces and delay warnings;
`DeliveryPacer` (pacer.py) keeps acceptance ahead of delivery under load.
"""

from gsmtp.queue.destinations import INITIAL_WINDOW, Destinations
from gsmtp.queue.manager import QueueManager
from gsmtp.queue.notices import Notices, NoticeSettings
from gsmtp.queue.pacer import DeliveryPacer
from gsmtp.queue.retry import RetryPolicy

__all__ = [
    "INITIAL_WINDOW",
    "DeliveryPacer",
    "Destinations",
    "NoticeSettings",
    "Notices",
    "QueueManager",
    "RetryPolicy",
]

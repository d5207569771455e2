"""nestvox clients: each a script (`python clients/NAME.py --help`) and an importable module.

    clients.file     stream a wav file as one turn, print the reply and its latency
    clients.mic      talk from the microphone (sounddevice)
    clients.profile  latency vs encoder chunk size, table + PNG plot
    clients.load     N simulated callers against a loopback server
    clients.common   what they share: connect, PCM16, wav reading, one turn, latency tables
"""

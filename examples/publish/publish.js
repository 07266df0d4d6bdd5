// Publishing a Hookline event from Node.js with amqplib (npm install amqplib).
//   node examples/publish/publish.js amqp://guest:guest@127.0.0.1:5672/ webhooks
const amqp = require("amqplib");
const { randomUUID } = require("crypto");

async function main() {
  const [url, exchange] = process.argv.slice(2);
  const connection = await amqp.connect(url);
  // A confirm channel: the callback fires once the broker has taken the message.
  const channel = await connection.createConfirmChannel();
  await channel.assertExchange(exchange, "topic", { durable: true });
  channel.on("return", (message) => {
    console.error(`unroutable: no endpoint subscribes to ${message.fields.routingKey}`);
    process.exitCode = 1;
  });
  const event = {
    id: `evt_${randomUUID().replace(/-/g, "")}`,
    type: "order.created",
    timestamp: new Date().toISOString(),
    data: { order_id: 1 },
  };
  channel.publish(exchange, event.type, Buffer.from(JSON.stringify(event)), {
    persistent: true,
    mandatory: true,
    contentType: "application/json",
    messageId: event.id,
  });
  await channel.waitForConfirms();
  console.log(event.id);
  await connection.close();
}

main().catch((error) => {
  console.error(error.message);
  process.exit(1);
});
